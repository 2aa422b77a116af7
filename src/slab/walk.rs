//! Walking a segment block by block (by the sizes in their headers): listing what is in
//! use, and rebuilding the free lists after a process died holding the heap lock. The
//! size words are always consistent (one store per transition); links may not be.
use super::block::{pack, unpack, SlabRef, HEADER_LEN, STATE_FREE, STATE_USED};
use super::Slab;
use crate::sync::Ordering;

impl Slab {
    /// Every block in use with its owner word, walked under the heap lock.
    pub fn used_blocks(&self) -> Vec<(SlabRef, u64)> {
        let _guard = self.lock(&self.control().heap_lock);
        self.used_blocks_locked()
    }

    /// `used_blocks` without the heap lock, for reports only (the text of a `Full` error):
    /// every field is an atomic and every step is bounds-checked, so a walk racing with
    /// splits and merges is sound, but it may stop early or miss a block.
    pub fn used_blocks_for_report(&self) -> Vec<(SlabRef, u64)> {
        self.used_blocks_locked()
    }

    /// `used_blocks` for a caller that holds the heap lock.
    pub(super) fn used_blocks_locked(&self) -> Vec<(SlabRef, u64)> {
        let count = self.heap().segment_count.load(Ordering::Acquire) as usize;
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
                if size < HEADER_LEN || offset + size > segment.len() {
                    break;
                }
                if state == STATE_USED {
                    used.push((block, header.owner.load(Ordering::Relaxed)));
                }
                offset += size;
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
        let count = heap.segment_count.load(Ordering::Acquire) as usize;
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
                if size < HEADER_LEN || offset + size > len {
                    break;
                }
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
                offset += size;
            }
            if let Some((start, run)) = free_run {
                self.finish_free_run(start, run);
            }
        }
        heap.used_bytes.store(used_bytes, Ordering::Relaxed);
        heap.used_blocks.store(used_blocks, Ordering::Relaxed);
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
