//! Sizes the encoder computes from what a caller hands it: the bytes of an array from its
//! shape and element size, C-order strides, the memory a strided view spans. Every one is
//! checked, because release builds wrap on overflow, and a size that wrapped allocates a
//! small block and then copies a large array into it.
//!
//! The limit is [`MAX_BYTES`] (`isize::MAX`): no allocation, slice or pointer offset may
//! span more, and NumPy refuses arrays past it too.

/// The most bytes an array, a payload area or a frame may span.
pub const MAX_BYTES: usize = isize::MAX as usize;

/// Bytes of a C-contiguous array of `shape` with `itemsize`-byte elements; `None` when a
/// dimension or the product of the nonzero dimensions with `itemsize` exceeds
/// [`MAX_BYTES`]. As in NumPy, an empty axis does not excuse the others, so the C-order
/// strides of every shape accepted here fit in `isize` ([`contiguous_strides`]).
pub fn array_nbytes(shape: &[usize], itemsize: usize) -> Option<usize> {
    let mut extent = itemsize;
    let mut empty = false;
    for &dim in shape {
        if dim > MAX_BYTES {
            return None;
        }
        if dim == 0 {
            empty = true;
        } else {
            extent = extent.checked_mul(dim)?;
        }
    }
    if extent > MAX_BYTES {
        return None;
    }
    Some(if empty { 0 } else { extent })
}

/// C-order strides, in units of `itemsize` bytes, of `shape` (length-0 and length-1 axes
/// count as 1, as NumPy computes them); `None` when one, or a dimension it multiplies,
/// does not fit in `isize`.
pub fn contiguous_strides(shape: &[usize], itemsize: usize) -> Option<Vec<isize>> {
    let mut strides = vec![0isize; shape.len()];
    let mut step = isize::try_from(itemsize).ok()?;
    for axis in (0..shape.len()).rev() {
        strides[axis] = step;
        // The outermost dimension is in no stride.
        if axis > 0 {
            step = step.checked_mul(isize::try_from(shape[axis].max(1)).ok()?)?;
        }
    }
    Some(strides)
}

/// Byte strides from strides counted in elements (DLPack's unit); `None` on overflow.
pub fn byte_strides(element_strides: &[i64], itemsize: usize) -> Option<Vec<isize>> {
    let itemsize = isize::try_from(itemsize).ok()?;
    element_strides
        .iter()
        .map(|&stride| isize::try_from(stride).ok()?.checked_mul(itemsize))
        .collect()
}

/// The bytes a strided view of `shape` touches, as `(low, high)` offsets from its first
/// element's address (`low <= 0 < high`); `None` when an offset does not fit in `isize`.
/// An empty view touches nothing: `(0, 0)`.
///
/// Every element's offset (the sum of `index * stride` over the axes, and each partial sum
/// of it) lies in `low..high`, so a gather that walks the view computes no offset outside
/// `isize` once this returned `Some`.
pub fn strided_span(shape: &[usize], strides: &[isize], itemsize: usize) -> Option<(isize, isize)> {
    if shape.contains(&0) {
        return Some((0, 0));
    }
    let mut low = 0isize;
    let mut high = isize::try_from(itemsize).ok()?;
    for (&dim, &stride) in shape.iter().zip(strides) {
        let reach = isize::try_from(dim - 1).ok()?.checked_mul(stride)?;
        if reach < 0 {
            low = low.checked_add(reach)?;
        } else {
            high = high.checked_add(reach)?;
        }
    }
    // The span's length must be addressable too.
    high.checked_sub(low)?;
    Some((low, high))
}

/// Why [`array_nbytes`] refused `shape` with `itemsize`-byte elements, with the size it
/// asked for: e.g. `tensor of shape (4611686018427387904,) with 4-byte elements needs
/// 18446744073709551616 bytes, more than the 9223372036854775807 bytes an array may span`.
pub fn describe_unaddressable(what: &str, shape: &[usize], itemsize: usize) -> String {
    let shown = python_shape(shape);
    if let Some(dim) = shape.iter().find(|&&dim| dim > MAX_BYTES) {
        return format!(
            "{what} of shape {shown} has a dimension of {dim}, more than the {MAX_BYTES} an array may have"
        );
    }
    // In u128 the product of up to 64 dimensions below 2^63 still overflows; say so.
    let needs = shape
        .iter()
        .filter(|&&dim| dim != 0)
        .try_fold(itemsize as u128, |acc, &dim| acc.checked_mul(dim as u128))
        .map_or_else(
            || "more than 2^128 bytes".to_owned(),
            |n| format!("{n} bytes"),
        );
    if shape.contains(&0) {
        format!(
            "{what} of shape {shown} with {itemsize}-byte elements is empty, but its other \
             dimensions need {needs}, more than the {MAX_BYTES} bytes an array may span \
             (its strides would overflow)"
        )
    } else {
        format!(
            "{what} of shape {shown} with {itemsize}-byte elements needs {needs}, more than \
             the {MAX_BYTES} bytes an array may span"
        )
    }
}

/// `shape` as Python writes a tuple: `()`, `(7,)`, `(2, 3)`.
pub fn python_shape(shape: &[usize]) -> String {
    match shape {
        [dim] => format!("({dim},)"),
        _ => {
            let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
            format!("({})", dims.join(", "))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LIMIT: u128 = MAX_BYTES as u128;

    /// Dimensions from empty to far past any memory.
    fn dim() -> impl Strategy<Value = usize> {
        prop_oneof![
            0usize..6,
            (0u32..64).prop_map(|bits| 1usize << bits),
            Just(MAX_BYTES),
            Just(MAX_BYTES + 1),
            Just(usize::MAX),
            any::<usize>(),
        ]
    }

    fn itemsize() -> impl Strategy<Value = usize> {
        prop_oneof![0usize..=16, Just(1 << 20), Just(MAX_BYTES), any::<usize>()]
    }

    fn stride() -> impl Strategy<Value = isize> {
        prop_oneof![
            -16isize..=16,
            (0u32..63).prop_map(|bits| 1isize << bits),
            (0u32..63).prop_map(|bits| -(1isize << bits)),
            Just(isize::MIN),
            any::<isize>(),
        ]
    }

    /// The exact product in u128, `None` past u128 itself.
    fn exact_extent(shape: &[usize], itemsize: usize) -> Option<u128> {
        shape
            .iter()
            .filter(|&&dim| dim != 0)
            .try_fold(itemsize as u128, |acc, &dim| acc.checked_mul(dim as u128))
    }

    proptest! {
        #[test]
        fn array_nbytes_is_the_exact_product_when_it_fits(
            shape in prop::collection::vec(dim(), 0..6),
            itemsize in itemsize(),
        ) {
            let fits = shape.iter().all(|&dim| dim as u128 <= LIMIT)
                && exact_extent(&shape, itemsize).is_some_and(|extent| extent <= LIMIT);
            match array_nbytes(&shape, itemsize) {
                None => prop_assert!(!fits),
                Some(nbytes) => {
                    prop_assert!(fits);
                    let exact = if shape.contains(&0) { 0 } else { exact_extent(&shape, itemsize).unwrap() };
                    prop_assert_eq!(nbytes as u128, exact);
                }
            }
        }

        #[test]
        fn accepted_shapes_have_strides_that_fit(
            shape in prop::collection::vec(dim(), 0..6),
            itemsize in itemsize(),
        ) {
            if array_nbytes(&shape, itemsize).is_some() {
                let strides = contiguous_strides(&shape, itemsize);
                prop_assert!(strides.is_some(), "{:?} x {}", shape, itemsize);
                let strides = strides.unwrap();
                // Each stride is the exact product of what follows it.
                for (axis, &stride) in strides.iter().enumerate() {
                    let exact = shape[axis + 1..]
                        .iter()
                        .fold(itemsize as u128, |acc, &dim| acc * dim.max(1) as u128);
                    prop_assert_eq!(stride as u128, exact);
                }
            }
        }

        #[test]
        fn contiguous_strides_refuse_only_what_does_not_fit(
            shape in prop::collection::vec(dim(), 0..6),
            itemsize in itemsize(),
        ) {
            // In i128: every stride (the element size times the dimensions inside its
            // axis), and each of those dimensions, must fit in isize.
            let mut step = itemsize as i128;
            let mut fits = step <= isize::MAX as i128;
            for axis in (1..shape.len()).rev() {
                fits &= shape[axis] as u128 <= LIMIT;
                step = step.saturating_mul(shape[axis].max(1) as i128);
                fits &= step <= isize::MAX as i128;
            }
            prop_assert_eq!(contiguous_strides(&shape, itemsize).is_some(), fits);
        }

        #[test]
        fn byte_strides_are_exact_or_refused(
            strides in prop::collection::vec(any::<i64>(), 0..6),
            itemsize in itemsize(),
        ) {
            let exact: Vec<i128> = strides.iter().map(|&s| s as i128 * itemsize as i128).collect();
            let fits = itemsize as u128 <= LIMIT
                && exact.iter().all(|&s| s >= isize::MIN as i128 && s <= isize::MAX as i128);
            match byte_strides(&strides, itemsize) {
                None => prop_assert!(!fits),
                Some(bytes) => {
                    prop_assert!(fits);
                    let got: Vec<i128> = bytes.iter().map(|&s| s as i128).collect();
                    prop_assert_eq!(got, exact);
                }
            }
        }

        #[test]
        fn strided_span_holds_every_element(
            axes in prop::collection::vec((dim(), stride()), 0..5),
            itemsize in itemsize(),
        ) {
            let (shape, strides): (Vec<usize>, Vec<isize>) = axes.into_iter().unzip();
            let span = strided_span(&shape, &strides, itemsize);
            if shape.contains(&0) {
                prop_assert_eq!(span, Some((0, 0)));
                return Ok(());
            }
            // The exact span in i128 (each term fits: |dim| < 2^64, |stride| <= 2^63;
            // a sum that saturates is far out of range either way).
            let mut low = 0i128;
            let mut high = itemsize as i128;
            for (&dim, &stride) in shape.iter().zip(&strides) {
                let reach = (dim as i128 - 1) * stride as i128;
                if reach < 0 {
                    low = low.saturating_add(reach);
                } else {
                    high = high.saturating_add(reach);
                }
            }
            let fits = low >= isize::MIN as i128
                && high <= isize::MAX as i128
                && high - low <= isize::MAX as i128
                && shape.iter().all(|&dim| dim as u128 <= LIMIT + 1);
            match span {
                None => prop_assert!(!fits),
                Some((got_low, got_high)) => {
                    prop_assert!(fits);
                    prop_assert_eq!((got_low as i128, got_high as i128), (low, high));
                }
            }
        }
    }

    #[test]
    fn zero_stride_views_span_one_element() {
        let huge = 1usize << 62;
        assert_eq!(strided_span(&[huge, 3], &[0, 0], 8), Some((0, 8)));
        assert_eq!(strided_span(&[huge, 3], &[0, -8], 8), Some((-16, 8)));
        // The array itself is unaddressable: 2^62 * 3 * 8 bytes.
        assert_eq!(array_nbytes(&[huge, 3], 8), None);
    }

    #[test]
    fn refusals_name_the_shape_and_the_size() {
        let huge = 1usize << 62;
        assert_eq!(
            describe_unaddressable("tensor", &[huge], 4),
            "tensor of shape (4611686018427387904,) with 4-byte elements needs \
             18446744073709551616 bytes, more than the 9223372036854775807 bytes an array may span"
        );
        let empty = describe_unaddressable("array", &[huge, huge, 0], 1);
        assert!(
            empty.contains("(4611686018427387904, 4611686018427387904, 0)"),
            "{empty}"
        );
        assert!(
            empty.contains(&format!("{} bytes", 1u128 << 124)),
            "{empty}"
        );
        let wide = describe_unaddressable("array", &[MAX_BYTES + 1], 1);
        assert!(wide.contains("dimension of 9223372036854775808"), "{wide}");
        let past_u128 = describe_unaddressable("array", &[huge; 3], 8);
        assert!(past_u128.contains("more than 2^128 bytes"), "{past_u128}");
        assert_eq!(python_shape(&[]), "()");
        assert_eq!(python_shape(&[2, 3]), "(2, 3)");
    }

    #[test]
    fn empty_arrays_follow_numpy() {
        // NumPy: np.empty((0, 2**62)) is fine, np.empty((2**62, 2**62, 0)) is not.
        assert_eq!(array_nbytes(&[0, 1 << 62], 1), Some(0));
        assert_eq!(array_nbytes(&[1 << 62, 1 << 62, 0], 1), None);
        assert_eq!(array_nbytes(&[0, MAX_BYTES + 1], 0), None);
        assert_eq!(array_nbytes(&[], 8), Some(8));
    }
}
