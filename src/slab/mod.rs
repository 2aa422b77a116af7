//! The slab: a general-purpose allocator over shared-memory segments, shared by every
//! process of a channel.
//!
//! Each segment is carved into blocks with boundary tags (see `block.rs`); free blocks sit
//! in size-class bins (see `bins.rs`) linked through their headers; neighbours are merged
//! on free, so memory returns to one block when every message is released and the slab
//! never creeps. All of this is guarded by the heap lock: critical sections are a few
//! pointer updates; payload copies happen outside it.
//!
//! The slab grows on demand by adding a segment (sizes double the mapped total) up to
//! `max_slab_bytes`. Each process maps segments lazily the first time it meets a
//! reference into one, by opening the descriptor of a process that holds it.
//!
//! This module never blocks waiting for space: `allocate` returns `None` and the channel
//! decides whether to wait.
mod bins;
pub mod block;
mod freelist;
mod grow;
mod refcount;
mod refs;
mod walk;

use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};
use crate::layout::{ControlBlock, HeapState, LockWord, MAX_SEGMENTS};
use crate::lock::{Holder, LockGuard, GENERATION_MASK};
use crate::procs::SlotId;
use crate::shm::{format_bytes, Backing, FileIdentity, Liveness, Segment};
use crate::sync::{AtomicU64, Ordering};
use crate::wait::futex_wake;
use crate::wait::TimeoutKind;
use block::{owner_kind, pack, unpack, MIN_BLOCK, OWNER_ALLOC, STATE_FREE, STATE_USED};
pub use block::{BlockHeader, SlabRef, HEADER_LEN};
pub use refs::BuffersOf;

/// A process's view of the slab.
pub struct Slab {
    control: Arc<Segment>,
    segments: Vec<OnceLock<Segment>>,
    /// Serialises mapping segments in this process. Not a `Mutex`: the watcher thread may
    /// hold it when another thread forks, and a fork child (where that thread does not
    /// exist) must be able to take it back (`after_fork_in_child`).
    attaching: std::sync::atomic::AtomicBool,
    backing: Backing,
    channel_id: u64,
    /// This process's slot and its generation, `SlotId::pack` (changes in a fork child).
    slot: AtomicU64,
    /// Lists the `alloc` blocks a message frame references (the wire format lives above
    /// this layer; the channel supplies the parser). Used to recount references.
    buffers_of: BuffersOf,
    /// `ControlBlock::max_slab_bytes`, read once when this process joined: a peer that
    /// corrupted it later cannot make this process map arbitrary amounts of memory.
    max_slab_bytes: u64,
}

/// A block handed out by `allocate`.
#[derive(Clone, Copy, Debug)]
pub struct Allocation {
    pub block: SlabRef,
    /// Address of the content (header + 64) in this process.
    pub address: *mut u8,
    pub capacity: usize,
}

/// Holds `Slab::attaching` (a flag lock: attaching takes milliseconds, so waiters sleep).
struct AttachGuard<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> AttachGuard<'a> {
    fn take(flag: &'a std::sync::atomic::AtomicBool) -> AttachGuard<'a> {
        // Acquire: pairs with the Release in `drop`, so the previous holder's OnceLock
        // initialisation is visible.
        while flag
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        AttachGuard(flag)
    }
}

impl Drop for AttachGuard<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Slab {
    /// In a fork child: frees the attach lock, which a thread of the parent that does not
    /// exist here may have held at the fork.
    pub fn after_fork_in_child(&self) {
        self.attaching.store(false, Ordering::Release);
    }

    pub fn new(
        control: Arc<Segment>,
        backing: Backing,
        channel_id: u64,
        slot: SlotId,
        buffers_of: BuffersOf,
    ) -> Slab {
        // SAFETY: as in `control()`: a validated ControlBlock at the start of the segment.
        let max_slab_bytes = unsafe { &*control.base().cast::<ControlBlock>() }
            .max_slab_bytes
            .load(Ordering::Relaxed);
        Slab {
            max_slab_bytes,
            control,
            segments: (0..MAX_SEGMENTS).map(|_| OnceLock::new()).collect(),
            attaching: std::sync::atomic::AtomicBool::new(false),
            backing,
            channel_id,
            slot: AtomicU64::new(slot.pack()),
            buffers_of,
        }
    }

    pub fn control(&self) -> &ControlBlock {
        // SAFETY: the control segment starts with a validated, initialised ControlBlock
        // (checked by `Channel::create/attach`) and stays mapped as long as `self.control`.
        unsafe { &*self.control.base().cast::<ControlBlock>() }
    }

    fn heap(&self) -> &HeapState {
        &self.control().heap
    }

    pub fn slot(&self) -> u16 {
        self.slot_id().index
    }

    /// This process's slot with the generation of its tenure.
    pub fn slot_id(&self) -> SlotId {
        SlotId::unpack(self.slot.load(Ordering::Relaxed))
    }

    pub fn set_slot(&self, slot: SlotId) {
        self.slot.store(slot.pack(), Ordering::Relaxed);
    }

    pub fn control_segment(&self) -> &Segment {
        &self.control
    }

    /// Maps every segment of the slab this process has not mapped yet.
    /// True when every segment of the slab that is not lost is mapped in this process.
    pub fn all_attached(&self) -> bool {
        // Acquire: pairs with the Release store in `grow`.
        let count = self.heap().segment_count.load(Ordering::Acquire) as usize;
        (0..count.min(self.segments.len()))
            .all(|index| self.segments[index].get().is_some() || self.is_lost(index))
    }

    pub fn attach_all(&self) -> Result<()> {
        // Acquire: pairs with the Release store in `grow`.
        let count = self.heap().segment_count.load(Ordering::Acquire) as usize;
        for index in 0..count {
            if !self.is_lost(index) {
                self.segment(index)?;
            }
        }
        Ok(())
    }

    /// True when a live process other than this one holds segment `index`, so it survives
    /// this process (a memfd lives as long as someone holds it).
    pub fn held_elsewhere(&self, index: usize) -> bool {
        let me = usize::from(self.slot());
        self.control()
            .processes
            .iter()
            .enumerate()
            .any(|(slot, record)| {
                slot != me
                    && record
                        .segment_fds
                        .get(index)
                        .is_some_and(|fd| fd.load(Ordering::Acquire) >= 0)
                    && self.may_be_alive(slot as u16)
            })
    }

    /// True when another process that may be alive uses the channel at all.
    pub fn has_peers(&self) -> bool {
        let me = usize::from(self.slot());
        (0..self.control().processes.len()).any(|slot| slot != me && self.may_be_alive(slot as u16))
    }

    /// Publishes this process's descriptors of every segment it maps (after a fork the
    /// child has the same descriptors under a new slot).
    pub fn publish_mapped_segments(&self) {
        let slot = &self.control().processes[usize::from(self.slot())];
        for (index, cell) in self.segments.iter().enumerate() {
            if let Some(segment) = cell.get() {
                slot.segment_fds[index].store(segment.raw_fd(), Ordering::Release);
            }
        }
    }

    pub fn backing(&self) -> &Backing {
        &self.backing
    }

    /// Takes a lock of the control block, breaking it if its holder died. Breaking the heap
    /// lock repairs what the holder may have left half-done: free lists and `alloc`
    /// reference counts are derived data and are rebuilt from the blocks.
    pub fn lock<'a>(&'a self, word: &'a LockWord) -> Result<LockGuard<'a>> {
        let me = self.slot_id();
        if crate::wait::is_quick() {
            // Spin and yield a little, never sleep: a holder that is slow, stopped or dead
            // is dealt with by the normal retry.
            let guard = word
                .try_lock(Holder::new(me.index, me.generation))
                .ok_or(Error::WouldBlock)?;
            self.after_acquiring(word);
            return Ok(guard);
        }
        let heap_lock = std::ptr::eq(word, &self.control().heap_lock);
        let mut expired = None;
        let guard = word.lock_until(
            Holder::new(me.index, me.generation),
            || {
                expired = crate::wait::call_expired();
                expired.is_some()
            },
            |holder| {
                let over = self.control().tenure_over(
                    holder.slot(),
                    holder.generation(),
                    GENERATION_MASK,
                    |process| process.liveness(),
                );
                if over {
                    if heap_lock {
                        // Before the lock is free again: whoever takes it next (this
                        // process or another, by any path) repairs what the dead holder left.
                        // Release: pairs with the Acquire swap in `after_acquiring`.
                        self.heap().needs_rebuild.store(1, Ordering::Release);
                    } else {
                        // The ring lock: a broadcast or mailbox holder may have dropped a
                        // block's last hold without freeing it. Release: pairs with the
                        // Acquire swap in `fanout::Channel::fan_out_lock`.
                        self.control()
                            .fan_out
                            .needs_sweep
                            .store(1, Ordering::Release);
                    }
                    word.force_release(holder);
                }
            },
        );
        let Some(guard) = guard else {
            return Err(self.lock_timeout(word, expired));
        };
        self.after_acquiring(word);
        Ok(guard)
    }

    /// The error of a call whose deadline passed while a live process held `word`.
    fn lock_timeout(&self, word: &LockWord, kind: Option<TimeoutKind>) -> Error {
        let which = if std::ptr::eq(word, &self.control().heap_lock) {
            "slab"
        } else {
            "ring"
        };
        let holder = word
            .holder()
            .and_then(|holder| self.control().processes.get(usize::from(holder.slot())))
            .and_then(|slot| slot.pid())
            .map_or_else(|| "no live process".to_string(), |pid| format!("pid {pid}"));
        let message = format!(
            "timed out waiting for the channel's {which} lock, held by {holder} (stopped, or stuck in a long critical section?)"
        );
        match kind {
            Some(TimeoutKind::Empty) => Error::Empty(message),
            _ => Error::Full(message),
        }
    }

    /// The heap lock if it can be had without waiting (a dead holder's lock is broken only
    /// by a waiting `lock`).
    pub fn try_lock_heap(&self) -> Option<LockGuard<'_>> {
        let me = self.slot_id();
        let word = &self.control().heap_lock;
        let guard = word.try_lock(Holder::new(me.index, me.generation))?;
        self.after_acquiring(word);
        Some(guard)
    }

    /// The ring lock if it can be had with a short spin (a dead holder's lock is broken only
    /// by a waiting `lock`).
    pub fn try_lock_ring(&self) -> Option<LockGuard<'_>> {
        let me = self.slot_id();
        self.control()
            .ring_lock
            .try_lock(Holder::new(me.index, me.generation))
    }

    /// Repairs, just after taking `word`, what a dead holder of the heap lock may have left
    /// half-done, or what a lost segment asks for (`HeapState::needs_rebuild`). The repair
    /// walks every segment, so it waits until this process can map them all: a walk that
    /// skipped one would drop its free blocks and undercount its messages' references.
    fn after_acquiring(&self, word: &LockWord) {
        let heap_lock = std::ptr::eq(word, &self.control().heap_lock);
        // Acquire: pairs with the Release stores in `lock` (breaking) and `mark_lost`.
        if heap_lock && self.heap().needs_rebuild.swap(0, Ordering::Acquire) != 0 {
            if self.attach_all().is_ok() {
                self.rebuild_free_lists();
                self.recount_buffer_refs();
            } else {
                // The next holder tries again.
                self.heap().needs_rebuild.store(1, Ordering::Release);
            }
        }
        crate::failpoint!("lock.acquired");
    }

    /// False only when the process in `slot` is definitely dead (or the slot is free); a
    /// process whose liveness cannot be looked up now counts as alive.
    pub fn may_be_alive(&self, slot: u16) -> bool {
        let Some(record) = self.control().processes.get(usize::from(slot)) else {
            return false;
        };
        record
            .occupant(slot)
            .is_some_and(|occupant| occupant.process.liveness() != Liveness::Dead)
    }

    /// The segment at `index`, mapping it into this process on first use.
    pub fn segment(&self, index: usize) -> Result<&Segment> {
        let cell = self
            .segments
            .get(index)
            .ok_or_else(|| Error::Incompatible(format!("slab segment {index} out of range")))?;
        if let Some(segment) = cell.get() {
            return Ok(segment);
        }
        let _serial = AttachGuard::take(&self.attaching);
        if let Some(segment) = cell.get() {
            return Ok(segment);
        }
        let heap = self.heap();
        // Acquire: pairs with the Release increment in `grow`, making the record visible.
        if index >= heap.segment_count.load(Ordering::Acquire) as usize {
            return Err(Error::Incompatible(format!(
                "reference to slab segment {index}, which does not exist"
            )));
        }
        if self.is_lost(index) {
            return Err(Error::Incompatible(format!(
                "slab segment {index} was lost: the process that created it died before any other mapped it"
            )));
        }
        let record = &heap.segments[index];
        let len = record.len.load(Ordering::Relaxed) as usize;
        let identity = FileIdentity {
            device: record.device.load(Ordering::Relaxed),
            inode: record.inode.load(Ordering::Relaxed),
        };
        let segment = self
            .attach_from_peers(len, identity, |slot| {
                slot.segment_fds[index].load(Ordering::Acquire)
            })
            .inspect_err(|error| {
                if matches!(error, Error::Closed(_)) {
                    self.mark_lost(index);
                }
            })?;
        crate::failpoint!("attach.mapped");
        self.control().processes[usize::from(self.slot())].segment_fds[index]
            .store(segment.raw_fd(), Ordering::Release);
        Ok(cell.get_or_init(|| segment))
    }

    /// Opens a segment through any live process that holds it. `Closed` when no process
    /// that may be alive has a descriptor of it (the segment is lost for good).
    pub fn attach_from_peers(
        &self,
        len: usize,
        identity: FileIdentity,
        fd_of: impl Fn(&crate::layout::ProcessSlot) -> i32,
    ) -> Result<Segment> {
        let mut last_error = None;
        for (index, slot) in self.control().processes.iter().enumerate() {
            let fd = fd_of(slot);
            let Some(occupant) = slot.occupant(index as u16) else {
                continue;
            };
            if fd < 0 {
                continue;
            }
            // Only a process known alive: a dead one's descriptor numbers may name
            // anything by now (`Segment::attach` checks the identity before opening, too).
            match occupant.process.liveness() {
                Liveness::Alive => {}
                Liveness::Dead => continue,
                Liveness::Unknown => {
                    last_error = Some(Error::Os {
                        context: format!(
                            "cannot tell whether process {} (which holds slab memory) is alive",
                            occupant.process.pid
                        ),
                        source: std::io::Error::other("liveness unknown"),
                    });
                    continue;
                }
            }
            match Segment::attach(occupant.process.pid, fd, len, identity) {
                Ok(segment) => return Ok(segment),
                Err(error) => last_error = Some(error),
            }
        }
        Err(match last_error {
            Some(error) => error,
            None => Error::Closed(format!(
                "channel {:016x}: no live process holds its shared memory any more",
                self.channel_id
            )),
        })
    }

    /// The slab's size limit (as read when this process joined).
    pub fn max_slab_bytes(&self) -> u64 {
        self.max_slab_bytes
    }

    /// The header of the block at `block`, bounds-checked.
    pub fn header(&self, block: SlabRef) -> Result<&BlockHeader> {
        let segment = self.segment(block.segment())?;
        let offset = block.offset();
        let inside = offset
            .checked_add(HEADER_LEN)
            .is_some_and(|end| end <= segment.len());
        if offset % HEADER_LEN != 0 || !inside {
            return Err(Error::Incompatible(format!(
                "slab reference {:#x} points outside segment {} ({} bytes)",
                block.0,
                block.segment(),
                segment.len()
            )));
        }
        // SAFETY: in bounds and 64-byte aligned (checked above) inside a live mapping;
        // every field is an atomic, so shared access is sound whatever the bytes hold.
        Ok(unsafe { &*segment.base().add(offset).cast::<BlockHeader>() })
    }

    /// A used block's content and capacity, after checking the reference really names a
    /// used block inside its segment whose header claims no more content than it holds.
    /// `content_len` is shared memory that another process may change at any time: a
    /// caller that reads it after this check still bounds it by the capacity returned.
    pub fn content(&self, block: SlabRef) -> Result<(&BlockHeader, *mut u8, usize)> {
        let header = self.header(block)?;
        let (size, state) = unpack(header.size_state.load(Ordering::Acquire));
        let segment = self.segment(block.segment())?;
        let inside = block
            .offset()
            .checked_add(size)
            .is_some_and(|end| end <= segment.len());
        if state != STATE_USED
            || header.check.load(Ordering::Acquire) != block.check_word()
            || size < MIN_BLOCK
            || !inside
        {
            return Err(Error::Incompatible(format!(
                "slab reference {:#x} does not name a block in use (corrupt descriptor?)",
                block.0
            )));
        }
        let capacity = size - HEADER_LEN;
        let len = header.content_len.load(Ordering::Relaxed);
        if len > capacity as u64 {
            return Err(Error::Incompatible(format!(
                "slab block {:#x} says it holds {len} bytes of content but has room for \
                 {capacity} (corrupt block header?)",
                block.0
            )));
        }
        // SAFETY: the block lies inside the segment (checked above).
        let address = unsafe { segment.base().add(block.offset() + HEADER_LEN) };
        Ok((header, address, capacity))
    }

    /// Block size needed for `content_len` bytes of content.
    pub fn block_size(content_len: usize) -> Option<usize> {
        let size = content_len
            .checked_add(HEADER_LEN)?
            .checked_next_multiple_of(HEADER_LEN)?;
        Some(size.max(MIN_BLOCK))
    }

    /// Allocates a block for `content_len` bytes, growing the slab if allowed.
    /// `Ok(None)`: no room now (the caller may wait on `HeapState::freed`, which is bumped
    /// when memory is freed or the slab grows).
    ///
    /// Growing creates and maps a segment (`memfd_create`, then every page reserved and
    /// faulted in by a few threads: milliseconds, seconds for gigabytes) *outside* the heap
    /// lock, so frees and other allocations never wait for it: the grower reserves the
    /// growth under the lock (`HeapState::growing`), creates the segment unlocked, and
    /// installs it under the lock. A reservation whose process
    /// died is taken over; other allocators meanwhile get `None` and wait for `freed`.
    pub fn allocate(&self, content_len: usize, owner: u64) -> Result<Option<Allocation>> {
        let size = Self::block_size(content_len).ok_or_else(|| too_large(content_len))?;
        let max = self.max_slab_bytes;
        if size as u64 > max {
            return Err(too_large_for(content_len, max));
        }
        let (index, len) = {
            let _guard = self.lock(&self.control().heap_lock)?;
            if let Some(block) = self.take_fitting(size)? {
                return self.carve(block, size, content_len, owner).map(Some);
            }
            if crate::wait::is_quick() {
                // Growing takes milliseconds (reserving and populating pages).
                return Err(Error::WouldBlock);
            }
            match self.reserve_growth(size)? {
                Some(growth) => growth,
                None => {
                    self.check_can_ever_fit(content_len, size)?;
                    return Ok(None);
                }
            }
        };
        let created = self.create_segment(index, len);
        // Installing (or giving the reservation back) must happen whatever the call's
        // deadline says: a reservation left behind would stop the slab from ever growing.
        let _whatever_the_deadline =
            crate::wait::call_scope(crate::wait::Deadline::never(), TimeoutKind::Full);
        let _guard = self.lock(&self.control().heap_lock)?;
        self.heap().growing.store(0, Ordering::Relaxed);
        let allocation = match created {
            Ok(segment) => {
                let block = self.install_segment(index, segment)?;
                self.carve(block, size, content_len, owner).map(Some)
            }
            Err(error) => Err(error),
        };
        drop(_guard);
        // Grown, or the reservation is free again: waiters look again.
        self.notify_space();
        allocation
    }

    /// Marks `block` (free, unlinked, at least `size` bytes) used for `content_len` bytes
    /// of `owner`, splitting off the tail. Heap lock held.
    fn carve(
        &self,
        block: SlabRef,
        size: usize,
        content_len: usize,
        owner: u64,
    ) -> Result<Allocation> {
        crate::failpoint!("allocate.taken");
        let header = self.header(block)?;
        let (found, _) = unpack(header.size_state.load(Ordering::Relaxed));
        // Read once, checked here: the free lists live in shared memory, and a corrupt size
        // must never let the copy into this block run past its segment.
        let segment_len = self.segment(block.segment())?.len();
        if found < size
            || block
                .offset()
                .checked_add(found)
                .is_none_or(|end| end > segment_len)
        {
            return Err(Error::Incompatible(format!(
                "free block {:#x} of {found} bytes does not hold {size} bytes inside its segment of {segment_len} (corrupt slab?)",
                block.0
            )));
        }
        // The block keeps the whole `found` unless the tail is worth a block of its own.
        let size = if found - size >= MIN_BLOCK {
            self.split(block, header, size, found)?;
            size
        } else {
            found
        };
        let refs = match owner_kind(owner) {
            OWNER_ALLOC => refs::CREATOR,
            _ => 1,
        };
        header.refs.store(refs, Ordering::Relaxed);
        header
            .origin
            .store(origin_word(self.slot_id()), Ordering::Relaxed);
        header.owner.store(owner, Ordering::Relaxed);
        header
            .content_len
            .store(content_len as u64, Ordering::Relaxed);
        header.check.store(block.check_word(), Ordering::Relaxed);
        // Release: the fields above are complete before the block reads as used.
        header
            .size_state
            .store(pack(size, STATE_USED), Ordering::Release);
        let heap = self.heap();
        heap.used_bytes.fetch_add(size as u64, Ordering::Relaxed);
        heap.used_blocks.fetch_add(1, Ordering::Relaxed);
        let segment = self.segment(block.segment())?;
        // SAFETY: the block lies inside the segment (it came from the free lists / growth).
        let address = unsafe { segment.base().add(block.offset() + HEADER_LEN) };
        Ok(Allocation {
            block,
            address,
            capacity: size - HEADER_LEN,
        })
    }

    /// Returns a block to the free lists, merging it with free neighbours. Heap lock held;
    /// the caller wakes producers waiting for memory (`notify_space`) once it is released.
    fn free_locked(&self, block: SlabRef) -> Result<()> {
        let header = self.header(block)?;
        let (size, _) = unpack(header.size_state.load(Ordering::Relaxed));
        header.check.store(0, Ordering::Relaxed);
        header
            .size_state
            .store(pack(size, STATE_FREE), Ordering::Relaxed);
        let heap = self.heap();
        heap.used_bytes.fetch_sub(size as u64, Ordering::Relaxed);
        heap.used_blocks.fetch_sub(1, Ordering::Relaxed);
        let merged = self.merge_neighbours(block, size)?;
        self.push_free(merged)
    }

    /// Wakes producers waiting for memory.
    pub(super) fn notify_space(&self) {
        let heap = self.heap();
        // SeqCst: pairs with the SeqCst increment of `space_waiters` and re-load of `freed`
        // in `Channel::wait_for_space` (no lost wake-up).
        heap.freed.fetch_add(1, Ordering::SeqCst);
        if heap.space_waiters.load(Ordering::SeqCst) > 0 {
            futex_wake(&heap.freed, i32::MAX);
        }
    }

    /// True if a block for `content_len` bytes could be allocated right now.
    pub fn has_space(&self, content_len: usize) -> bool {
        let Some(size) = Self::block_size(content_len) else {
            return false;
        };
        let control = self.control();
        let max = self.max_slab_bytes;
        if size as u64 > max {
            return false;
        }
        let Ok(_guard) = self.lock(&control.heap_lock) else {
            return false;
        };
        let heap = self.heap();
        if heap
            .mapped_bytes
            .load(Ordering::Relaxed)
            .saturating_add(size as u64)
            <= max
            && (heap.segment_count.load(Ordering::Relaxed) as usize) < MAX_SEGMENTS
        {
            return true;
        }
        matches!(self.find_fitting(size), Ok(Some(_)))
    }

    /// (mapped bytes, used bytes, used blocks).
    pub fn usage(&self) -> (u64, u64, u64) {
        let heap = self.heap();
        (
            heap.mapped_bytes.load(Ordering::Relaxed),
            heap.used_bytes.load(Ordering::Relaxed),
            heap.used_blocks.load(Ordering::Relaxed),
        )
    }
}

/// A block's `origin`: the allocating slot and the low 16 bits of its generation.
pub fn origin_word(slot: SlotId) -> u32 {
    (slot.generation & 0xffff) << 16 | u32::from(slot.index)
}

fn too_large(content_len: usize) -> Error {
    Error::InvalidArgument(format!(
        "message of {content_len} bytes is too large to address"
    ))
}

fn too_large_for(content_len: usize, max: u64) -> Error {
    Error::InvalidArgument(format!(
        "message needs {} ({} bytes) but max_slab_bytes is {} ({max} bytes); raise max_slab_bytes",
        format_bytes(content_len as u64),
        content_len,
        format_bytes(max)
    ))
}

#[cfg(all(test, not(loom)))]
mod tests;
