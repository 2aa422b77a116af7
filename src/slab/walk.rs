//! Walking a segment block by block (by the sizes in their headers): listing what is in
//! use, and rebuilding the free lists after a process died holding the heap lock. The
//! size words are always consistent (one store per transition); links may not be.
//!
//! Sizes and the segment count are read from shared memory, so a walk trusts none of them:
//! it visits at most `MAX_SEGMENTS` segments and ends a segment's walk at the first size
//! that is too small or would reach past the segment's end (each step moves forward by at
//! least a header, so a walk always ends).
use super::block::{pack, unpack, SlabRef, HEADER_LEN, STATE_FREE, STATE_USED};
use super::Slab;
use crate::layout::MAX_SEGMENTS;
use crate::sync::Ordering;

/// The offset after a block of `size` at `offset`, if that block lies inside a segment of
/// `len` bytes and is at least a header long.
fn next_offset(offset: usize, size: usize, len: usize) -> Option<usize> {
    let end = offset.checked_add(size)?;
    (size >= HEADER_LEN && end <= len).then_some(end)
}

impl Slab {
    /// Every block in use with its owner word, walked under the heap lock.
    pub fn used_blocks(&self) -> crate::Result<Vec<(SlabRef, u64)>> {
        let _guard = self.lock(&self.control().heap_lock)?;
        Ok(self.used_blocks_locked())
    }

    /// `used_blocks` without the heap lock, for reports only (the text of a `Full` error):
    /// every field is an atomic and every step is bounds-checked, so a walk racing with
    /// splits and merges is sound, but it may stop early or miss a block.
    pub fn used_blocks_for_report(&self) -> Vec<(SlabRef, u64)> {
        self.used_blocks_locked()
    }

    /// `used_blocks` for a caller that holds the heap lock.
    pub(super) fn used_blocks_locked(&self) -> Vec<(SlabRef, u64)> {
        let count = self.walked_segments();
        let mut used = vec![];
        for index in 0..count {
            let Ok(segment) = self.segment(index) else {
                continue;
            };
            let mut offset = 0;
            while offset + HEADER_LEN <= segment.len() {
                let block = SlabRef::new(index, offset);
                let Ok(header) = self.header(block) else {
                    break;
                };
                let (size, state) = unpack(header.size_state.load(Ordering::Acquire));
                let Some(next) = next_offset(offset, size, segment.len()) else {
                    break;
                };
                if state == STATE_USED {
                    used.push((block, header.owner.load(Ordering::Relaxed)));
                }
                offset = next;
            }
        }
        used
    }

    /// Rebuilds every free list from the blocks' own headers. Run after breaking the heap
    /// lock of a process that died holding it: the size words are always consistent (one
    /// store per transition), the links and `prev_size` may not be.
    pub fn rebuild_free_lists(&self) {
        let heap = self.heap();
        for bin in heap.bins.iter() {
            bin.store(0, Ordering::Relaxed);
        }
        for word in heap.bitmap.iter() {
            word.store(0, Ordering::Relaxed);
        }
        let count = self.walked_segments();
        let (mut used_bytes, mut used_blocks) = (0u64, 0u64);
        for index in 0..count {
            let Ok(segment) = self.segment(index) else {
                continue;
            };
            let len = segment.len();
            let (mut offset, mut prev_size, mut free_run): (
                usize,
                usize,
                Option<(SlabRef, usize)>,
            ) = (0, 0, None);
            while offset + HEADER_LEN <= len {
                let block = SlabRef::new(index, offset);
                let Ok(header) = self.header(block) else {
                    break;
                };
                let (size, state) = unpack(header.size_state.load(Ordering::Relaxed));
                let Some(next) = next_offset(offset, size, len) else {
                    break;
                };
                if state == STATE_FREE {
                    free_run = Some(match free_run {
                        Some((start, run)) => (start, run + size),
                        None => {
                            header.prev_size.store(prev_size as u64, Ordering::Relaxed);
                            (block, size)
                        }
                    });
                } else {
                    if let Some((start, run)) = free_run.take() {
                        self.finish_free_run(start, run);
                        prev_size = run;
                    }
                    header.prev_size.store(prev_size as u64, Ordering::Relaxed);
                    used_bytes += size as u64;
                    used_blocks += 1;
                    prev_size = size;
                }
                offset = next;
            }
            if let Some((start, run)) = free_run {
                self.finish_free_run(start, run);
            }
        }
        heap.used_bytes.store(used_bytes, Ordering::Relaxed);
        heap.used_blocks.store(used_blocks, Ordering::Relaxed);
    }

    /// Segments a walk visits: the count in shared memory, but never past the table.
    fn walked_segments(&self) -> usize {
        // Acquire: pairs with the Release store in `grow`, making the records visible.
        (self.heap().segment_count.load(Ordering::Acquire) as usize).min(MAX_SEGMENTS)
    }

    fn finish_free_run(&self, start: SlabRef, size: usize) {
        if let Ok(header) = self.header(start) {
            header
                .size_state
                .store(pack(size, STATE_FREE), Ordering::Relaxed);
            let _ = self.push_free(start);
        }
    }
}
