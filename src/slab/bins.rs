//! Size classes of the free lists: four bins per power of two (as in TLSF), so a block
//! taken from a bin above the request's wastes at most a quarter of it, and finding a bin
//! is a few bit operations on the bitmap.
use crate::layout::BIN_COUNT;

use super::block::MIN_BLOCK;

const SUB_BITS: u32 = 2;
const MIN_LOG: u32 = MIN_BLOCK.trailing_zeros();

/// The bin a free block of `size` bytes lives in.
pub fn bin_of(size: usize) -> usize {
    debug_assert!(size >= MIN_BLOCK);
    let log = usize::BITS - 1 - size.leading_zeros();
    let sub = (size >> (log - SUB_BITS)) & ((1 << SUB_BITS) - 1);
    (((log - MIN_LOG) << SUB_BITS) as usize + sub).min(BIN_COUNT - 1)
}

/// The smallest bin whose every block is at least `size` bytes.
pub fn first_bin_fitting(size: usize) -> usize {
    let bin = bin_of(size);
    if lower_bound(bin) == size {
        bin
    } else {
        bin + 1
    }
}

/// Smallest size that lands in `bin`.
pub fn lower_bound(bin: usize) -> usize {
    let log = (bin >> SUB_BITS) as u32 + MIN_LOG;
    let sub = bin & ((1 << SUB_BITS) - 1);
    (1usize << log) + (sub << (log - SUB_BITS))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bins_are_monotonic_and_bounds_fit() {
        let mut last = 0;
        for size in (MIN_BLOCK..1 << 22).step_by(64) {
            let bin = bin_of(size);
            assert!(bin >= last);
            last = bin;
            assert!(lower_bound(bin) <= size);
            assert!(lower_bound(first_bin_fitting(size)) >= size);
        }
        assert_eq!(bin_of(MIN_BLOCK), 0);
        assert!(bin_of(1 << 40) < BIN_COUNT);
    }
}
