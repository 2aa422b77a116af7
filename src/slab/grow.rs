//! Growing the slab: sizing, reserving, creating and installing a new segment (outside
//! the heap lock but for the reservation and the install, see `Slab::allocate`), and
//! segments lost for good because no live process holds them any more.
use super::block::{pack, BlockHeader, SlabRef, STATE_FREE};
use super::Slab;
use crate::error::{Error, Result};
use crate::layout::MAX_SEGMENTS;
use crate::lock::{Holder, GENERATION_MASK};
use crate::shm::{format_bytes, Segment};
use crate::sync::Ordering;
use crate::wait::futex_wake;

/// Segments are multiples of the page size.
pub(super) const PAGE: usize = 4096;
/// Past the first segment, the slab grows by at least this share of what it maps already,
/// so the number of segments stays logarithmic (48 of them reach petabytes).
const GROWTH_DIVISOR: usize = 4;

/// Length of the next segment, for a block of `size` that fits nowhere else: the first one
/// is `first` (`slab_bytes`) at least; later ones about a quarter of what is mapped, but
/// always a whole number of `size` blocks, so the equal-sized messages that usually fill a
/// slab pack with no tail wasted (and the slab maps little more than the peak in flight).
pub(super) fn segment_len(
    size: usize,
    index: usize,
    first: u64,
    mapped: u64,
    room: usize,
) -> usize {
    let target = if index == 0 {
        (first as usize).max(size)
    } else {
        size.max(mapped as usize / GROWTH_DIVISOR)
    };
    let blocks = target.div_ceil(size);
    let whole_blocks = |count: usize| (count * size).next_multiple_of(PAGE);
    let mut len = whole_blocks(blocks);
    if len > room {
        len = whole_blocks((room / size).max(1)).min(room);
    }
    len
}

impl Slab {
    pub(super) fn is_lost(&self, index: usize) -> bool {
        self.heap()
            .segments
            .get(index)
            .is_some_and(|record| record.lost.load(Ordering::Acquire) != 0)
    }

    /// Records that segment `index` is gone for good: no live process holds it, so nobody
    /// can ever map it again (its creator died before any peer mapped it). Its blocks leave
    /// the free lists at the next taking of the heap lock (this may run under it).
    pub(super) fn mark_lost(&self, index: usize) {
        let heap = self.heap();
        let record = &heap.segments[index];
        // AcqRel: one process wins and does the accounting; pairs with `is_lost`.
        if record
            .lost
            .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            let len = record.len.load(Ordering::Relaxed);
            let _ = heap
                .mapped_bytes
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(len))
                });
            heap.needs_rebuild.store(1, Ordering::Release);
        }
    }

    /// Fails when no amount of waiting could make room for a block of `size`: segments never
    /// merge with each other, so the largest block the slab can ever hand out is its largest
    /// segment, or a new segment in the room `max_slab_bytes` leaves. Waiting for such a
    /// block would hang forever. Heap lock held.
    pub(super) fn check_can_ever_fit(&self, content_len: usize, size: usize) -> Result<()> {
        let heap = self.heap();
        let count = (heap.segment_count.load(Ordering::Relaxed) as usize).min(MAX_SEGMENTS);
        let largest_segment = heap.segments[..count]
            .iter()
            .map(|record| record.len.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let max = self.max_slab_bytes;
        let mapped = heap.mapped_bytes.load(Ordering::Relaxed);
        let room = if count < MAX_SEGMENTS {
            max.saturating_sub(mapped)
        } else {
            0
        };
        if size as u64 <= largest_segment.max(room) {
            return Ok(());
        }
        Err(Error::InvalidArgument(format!(
            "message needs {} but can never fit: the slab's largest segment is {} and \
             max_slab_bytes ({}) leaves room for {} more ({} mapped in {count} segments); \
             raise max_slab_bytes, or pass slab_bytes at least as large as the largest message",
            format_bytes(content_len as u64),
            format_bytes(largest_segment),
            format_bytes(max),
            format_bytes(room),
            format_bytes(mapped),
        )))
    }

    /// Reserves the growth of the slab by a segment big enough for a block of `size`:
    /// `(index, len)` of the segment to create, or `None` when `max_slab_bytes` leaves no
    /// room or another live process is growing it right now. Heap lock held.
    pub(super) fn reserve_growth(&self, size: usize) -> Result<Option<(usize, usize)>> {
        let control = self.control();
        let heap = self.heap();
        let growing = heap.growing.load(Ordering::Relaxed);
        if growing != 0 {
            let holder = Holder::from_word(growing);
            let over = holder.is_none_or(|holder| {
                control.tenure_over(
                    holder.slot(),
                    holder.generation(),
                    GENERATION_MASK,
                    |process| process.liveness(),
                )
            });
            if !over {
                return Ok(None);
            }
            // The grower died between reserving and installing: nothing of its growth is
            // visible (its segment died with it); take the reservation over.
        }
        let index = heap.segment_count.load(Ordering::Relaxed) as usize;
        let max = self.max_slab_bytes;
        let mapped = heap.mapped_bytes.load(Ordering::Relaxed);
        let room = max.saturating_sub(mapped) as usize / PAGE * PAGE;
        if index >= MAX_SEGMENTS || room < size {
            return Ok(None);
        }
        let len = segment_len(
            size,
            index,
            heap.next_segment_len.load(Ordering::Relaxed),
            mapped,
            room,
        );
        let me = self.slot_id();
        heap.growing.store(
            Holder::new(me.index, me.generation).word(),
            Ordering::Relaxed,
        );
        Ok(Some((index, len)))
    }

    /// Creates and maps the segment a reservation planned (no lock held).
    pub(super) fn create_segment(&self, index: usize, len: usize) -> Result<Segment> {
        let heap = self.heap();
        let name = format!("tensorslab-{:016x}-{index}", self.channel_id);
        crate::failpoint!("grow.creating");
        Segment::create(&self.backing, &name, len).map_err(|error| {
            grow_error(
                error,
                len,
                heap.mapped_bytes.load(Ordering::Relaxed),
                self.max_slab_bytes,
            )
        })
    }

    /// Makes a created segment part of the slab (heap lock held); returns it as one free,
    /// unlinked block.
    pub(super) fn install_segment(&self, index: usize, segment: Segment) -> Result<SlabRef> {
        let heap = self.heap();
        let len = segment.len();
        crate::failpoint!("grow.created");
        let record = &heap.segments[index];
        record.len.store(len as u64, Ordering::Relaxed);
        record
            .device
            .store(segment.identity().device, Ordering::Relaxed);
        record
            .inode
            .store(segment.identity().inode, Ordering::Relaxed);
        self.control().processes[usize::from(self.slot())].segment_fds[index]
            .store(segment.raw_fd(), Ordering::Release);
        // SAFETY: a fresh segment is zero-filled and at least MIN_BLOCK long; its first
        // header becomes one free block spanning it.
        let first = unsafe { &*segment.base().cast::<BlockHeader>() };
        first
            .size_state
            .store(pack(len, STATE_FREE), Ordering::Relaxed);
        first.prev_size.store(0, Ordering::Relaxed);
        if self.segments[index].set(segment).is_err() {
            return Err(Error::Incompatible(format!(
                "slab segment {index} created twice"
            )));
        }
        heap.mapped_bytes.fetch_add(len as u64, Ordering::Relaxed);
        // Release: pairs with the Acquire load in `segment()`; the record is complete.
        heap.segment_count
            .store(index as u32 + 1, Ordering::Release);
        // Every process's watcher sleeps on this word: wake them to attach the segment
        // (see `channel::watcher`).
        futex_wake(&heap.segment_count, i32::MAX);
        crate::failpoint!("grow.published");
        Ok(SlabRef::new(index, 0))
    }
}

fn grow_error(error: Error, len: usize, mapped: u64, max: u64) -> Error {
    match error {
        Error::Os { context, source } => Error::Os {
            context: format!(
                "{context} while growing the slab by {} (mapped {}, max_slab_bytes {})",
                format_bytes(len as u64),
                format_bytes(mapped),
                format_bytes(max)
            ),
            source,
        },
        other => other,
    }
}
