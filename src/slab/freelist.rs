//! The free lists: bins of free blocks linked through their headers, and the surgery on
//! them (take, split, merge with neighbours). Every function here runs under the heap lock.
use super::bins::{bin_of, first_bin_fitting};
use super::block::{pack, unpack, BlockHeader, SlabRef, STATE_FREE};
use super::Slab;
use crate::error::Result;
use crate::sync::Ordering;

impl Slab {
    pub(super) fn find_fitting(&self, size: usize) -> Result<Option<SlabRef>> {
        let heap = self.heap();
        // First fit among the first few blocks of the request's own bin: keeps exact-size
        // reuse (the common case of equal messages) without scanning long lists.
        let own = bin_of(size);
        let mut link = heap.bins[own].load(Ordering::Relaxed);
        for _ in 0..8 {
            let Some(block) = SlabRef::from_link(link) else {
                break;
            };
            if self.fits(block, size) {
                return Ok(Some(block));
            }
            link = self.header(block)?.next_free.load(Ordering::Relaxed);
        }
        let first = first_bin_fitting(size);
        for word_index in first / 64..heap.bitmap.len() {
            let mut word = heap.bitmap[word_index].load(Ordering::Relaxed);
            if word_index == first / 64 {
                word &= !0u64 << (first % 64);
            }
            if word != 0 {
                // The bitmap is shared memory: a bit past the last bin names no list.
                let bin = word_index * 64 + word.trailing_zeros() as usize;
                let Some(head) = heap.bins.get(bin) else {
                    return Ok(None);
                };
                let block = SlabRef::from_link(head.load(Ordering::Relaxed));
                return Ok(block.filter(|&block| self.fits(block, size)));
            }
        }
        Ok(None)
    }

    /// True when free block `block`, as its header says, holds `size` bytes and lies inside
    /// its segment (a block taken from a list whose header says otherwise would be carved
    /// past its real end).
    fn fits(&self, block: SlabRef, size: usize) -> bool {
        let (Ok(header), Ok(segment)) = (self.header(block), self.segment(block.segment())) else {
            return false;
        };
        let found = unpack(header.size_state.load(Ordering::Relaxed)).0;
        found >= size
            && block
                .offset()
                .checked_add(found)
                .is_some_and(|end| end <= segment.len())
    }

    pub(super) fn take_fitting(&self, size: usize) -> Result<Option<SlabRef>> {
        let Some(block) = self.find_fitting(size)? else {
            return Ok(None);
        };
        self.unlink_free(block)?;
        Ok(Some(block))
    }

    pub(super) fn push_free(&self, block: SlabRef) -> Result<()> {
        let heap = self.heap();
        let header = self.header(block)?;
        let (size, _) = unpack(header.size_state.load(Ordering::Relaxed));
        let bin = bin_of(size);
        let head = heap.bins[bin].load(Ordering::Relaxed);
        header.next_free.store(head, Ordering::Relaxed);
        header.prev_free.store(0, Ordering::Relaxed);
        if let Some(next) = SlabRef::from_link(head) {
            self.header(next)?
                .prev_free
                .store(block.link(), Ordering::Relaxed);
        }
        heap.bins[bin].store(block.link(), Ordering::Relaxed);
        heap.bitmap[bin / 64].fetch_or(1 << (bin % 64), Ordering::Relaxed);
        Ok(())
    }

    pub(super) fn unlink_free(&self, block: SlabRef) -> Result<()> {
        let heap = self.heap();
        let header = self.header(block)?;
        let (size, _) = unpack(header.size_state.load(Ordering::Relaxed));
        let bin = bin_of(size);
        let next = header.next_free.load(Ordering::Relaxed);
        let prev = header.prev_free.load(Ordering::Relaxed);
        match SlabRef::from_link(prev) {
            Some(prev) => self.header(prev)?.next_free.store(next, Ordering::Relaxed),
            None => heap.bins[bin].store(next, Ordering::Relaxed),
        }
        if let Some(next_block) = SlabRef::from_link(next) {
            self.header(next_block)?
                .prev_free
                .store(prev, Ordering::Relaxed);
        }
        if heap.bins[bin].load(Ordering::Relaxed) == 0 {
            heap.bitmap[bin / 64].fetch_and(!(1 << (bin % 64)), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Cuts `block` (free, unlinked, `found` bytes) down to `size`; the tail becomes free.
    pub(super) fn split(
        &self,
        block: SlabRef,
        header: &BlockHeader,
        size: usize,
        found: usize,
    ) -> Result<()> {
        let tail = SlabRef::new(block.segment(), block.offset() + size);
        let tail_header = self.header(tail)?;
        // Tail first, then shrink the head: a walk by sizes sees either the old whole
        // block or both halves, never a gap.
        tail_header.prev_size.store(size as u64, Ordering::Relaxed);
        tail_header
            .size_state
            .store(pack(found - size, STATE_FREE), Ordering::Relaxed);
        header
            .size_state
            .store(pack(size, STATE_FREE), Ordering::Relaxed);
        self.set_next_prev_size(tail, found - size)?;
        self.push_free(tail)
    }

    pub(super) fn set_next_prev_size(&self, block: SlabRef, size: usize) -> Result<()> {
        let segment_len = self.segment(block.segment())?.len();
        let next_offset = block.offset() + size;
        if next_offset < segment_len {
            let next = SlabRef::new(block.segment(), next_offset);
            self.header(next)?
                .prev_size
                .store(size as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Merges a newly freed block with free neighbours; returns the merged block.
    pub(super) fn merge_neighbours(&self, block: SlabRef, size: usize) -> Result<SlabRef> {
        let segment_len = self.segment(block.segment())?.len();
        let (mut start, mut size) = (block, size);
        let next_offset = start.offset() + size;
        if next_offset < segment_len {
            let next = SlabRef::new(start.segment(), next_offset);
            let (next_size, state) = unpack(self.header(next)?.size_state.load(Ordering::Relaxed));
            if state == STATE_FREE {
                self.unlink_free(next)?;
                size += next_size;
                self.header(start)?
                    .size_state
                    .store(pack(size, STATE_FREE), Ordering::Relaxed);
            }
        }
        let prev_size = self.header(start)?.prev_size.load(Ordering::Relaxed) as usize;
        if prev_size != 0 && prev_size <= start.offset() {
            let prev = SlabRef::new(start.segment(), start.offset() - prev_size);
            let (found, state) = unpack(self.header(prev)?.size_state.load(Ordering::Relaxed));
            if state == STATE_FREE && found == prev_size {
                self.unlink_free(prev)?;
                size += prev_size;
                start = prev;
                self.header(start)?
                    .size_state
                    .store(pack(size, STATE_FREE), Ordering::Relaxed);
            }
        }
        self.set_next_prev_size(start, size)?;
        Ok(start)
    }
}
