//! Copying payloads into a frame: one `memcpy` per contiguous payload, a row-wise gather
//! for strided ones. Runs without the GIL.
use super::{Payload, Source};

/// Copies every payload into the payload area starting at `area`.
///
/// # Safety
/// `area` must be valid for writes of `encoded.payload_len` bytes, and every payload's
/// source must still be alive (its `keep` held) and not overlap `area`.
pub unsafe fn copy_payloads(payloads: &[Payload], area: *mut u8) {
    for payload in payloads {
        // SAFETY: the caller guarantees the area holds every payload's offset + len.
        let destination = unsafe { area.add(payload.offset) };
        match &payload.source {
            Source::Contiguous { address, len } => {
                // SAFETY: `address..+len` is the live source (kept by `keep`), disjoint
                // from the slab block we write.
                unsafe { std::ptr::copy_nonoverlapping(*address, destination, *len) };
            }
            Source::Strided {
                address,
                itemsize,
                shape,
                strides,
            } => {
                // SAFETY: as above; the strides describe the source array's own layout.
                unsafe { copy_strided(*address, destination, *itemsize, shape, strides) };
            }
        }
    }
}

/// Gathers a strided array into C order at `destination`.
///
/// # Safety
/// `source` with `shape`/`strides` must describe readable memory, `destination` must be
/// writable for `product(shape) * itemsize` bytes.
unsafe fn copy_strided(
    source: *const u8,
    destination: *mut u8,
    itemsize: usize,
    shape: &[usize],
    strides: &[isize],
) {
    if shape.contains(&0) {
        return;
    }
    let ndim = shape.len();
    // Innermost run that is contiguous: copy whole rows when the last axis is dense.
    let row_dense = ndim > 0 && strides[ndim - 1] == itemsize as isize;
    let (outer, row_len) = if row_dense {
        (ndim - 1, shape[ndim - 1] * itemsize)
    } else {
        (ndim, itemsize)
    };
    let mut index = vec![0usize; outer];
    let mut written = 0usize;
    loop {
        let offset: isize = index
            .iter()
            .zip(strides)
            .map(|(i, s)| *i as isize * s)
            .sum();
        // SAFETY: `offset` addresses an element (row) of the source by its own strides;
        // `written` stays below the destination's length.
        unsafe {
            std::ptr::copy_nonoverlapping(source.offset(offset), destination.add(written), row_len)
        };
        written += row_len;
        let mut axis = outer;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}
