//! Who holds a used block, and every operation that changes it.
//!
//! A **message block** (owner kinds `SENDER`, `QUEUED`, `RECEIVER`) has one holder at a
//! time, named by its owner word: the producer filling it, then the ring, then the consumer
//! that took it. It is freed with [`Slab::free_message`] by its holder, or by whoever reaps
//! a dead holder.
//!
//! An **`alloc` block** (owner kinds `ALLOC`, `ORPHAN`) is held by its creator's views
//! (the [`CREATOR`] bit of `refs`) and by every *complete* message (owner `QUEUED` or
//! `RECEIVER`) that references it, once per entry in that message's frame. The creator's
//! bit can only be dropped once (it is a bit, not a count), by the creator or by whoever
//! reaps it: a dead creator's reference is never released twice.
//!
//! Every change to an `alloc` block's `refs` happens under the heap lock, in the same
//! critical section as the change that makes it true: a message becomes complete in the
//! section that counts its references ([`Slab::commit_message`]), and its references are
//! dropped in the section that frees it ([`Slab::free_message`]). The counts are therefore
//! derived data, like the free lists: a process that dies inside one of these sections
//! leaves the heap lock held, and whoever breaks it recounts them from the complete
//! messages' frames ([`Slab::recount_buffer_refs`]).
use std::collections::HashMap;

use super::block::{
    owner_kind, unpack, OWNER_ALLOC, OWNER_ORPHAN, OWNER_QUEUED, OWNER_RECEIVER, OWNER_SENDER,
    OWNER_SHARED, STATE_USED,
};
use super::{refcount, Slab, SlabRef};
use crate::error::{Error, Result};
use crate::sync::Ordering;

/// The `alloc` blocks a frame references; the channel supplies it (the wire format is a
/// layer above the slab). Must not panic on any bytes.
pub type BuffersOf = fn(&[u8]) -> Vec<SlabRef>;

/// `refs` bit of an `alloc` block: its creator (the process that called `alloc`) still
/// holds views of it.
pub const CREATOR: u32 = 1 << 31;

pub(super) fn is_message(owner: u64) -> bool {
    matches!(
        owner_kind(owner),
        OWNER_SENDER | OWNER_QUEUED | OWNER_RECEIVER | OWNER_SHARED
    )
}

/// A message whose frame's references are counted.
pub(super) fn is_complete_message(owner: u64) -> bool {
    matches!(owner_kind(owner), OWNER_QUEUED | OWNER_RECEIVER)
}

pub(super) fn is_alloc(owner: u64) -> bool {
    matches!(owner_kind(owner), OWNER_ALLOC | OWNER_ORPHAN)
}

pub(super) fn check_owner(
    block: SlabRef,
    header: &super::BlockHeader,
    expected: Option<u64>,
) -> Result<()> {
    let owner = header.owner.load(Ordering::Relaxed);
    match expected {
        Some(expected) if expected != owner => Err(Error::Incompatible(format!(
            "slab block {:#x} changed hands (owner word {owner:#x}, expected {expected:#x})",
            block.0
        ))),
        _ => Ok(()),
    }
}

impl Slab {
    /// A used block's header if its owner word satisfies `kind`, else an error naming it.
    fn used_header(
        &self,
        block: SlabRef,
        kind: fn(u64) -> bool,
        what: &str,
    ) -> Result<&super::BlockHeader> {
        let (header, _, _) = self.content(block)?;
        let owner = header.owner.load(Ordering::Relaxed);
        if !kind(owner) {
            return Err(Error::Incompatible(format!(
                "slab reference {:#x} names a block that is not {what} (owner word {owner:#x}; corrupt descriptor?)",
                block.0
            )));
        }
        Ok(header)
    }

    /// Makes `message` complete: counts one reference to each of `buffers` (the `alloc`
    /// blocks its frame lists) and hands it to `owner` (normally `QUEUED`), in one
    /// critical section. Fails, changing nothing, when one of them is not an `alloc` block
    /// in use.
    pub fn commit_message(&self, message: SlabRef, buffers: &[SlabRef], owner: u64) -> Result<()> {
        {
            let _guard = self.lock(&self.control().heap_lock)?;
            self.used_header(message, is_message, "a message")?;
            let headers = buffers
                .iter()
                .map(|&buffer| self.used_header(buffer, is_alloc, "an alloc buffer"))
                .collect::<Result<Vec<_>>>()?;
            crate::failpoint!("commit_message.counting");
            for header in headers {
                refcount::count_message(header);
            }
            self.header(message)?.owner.store(owner, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Frees a message block; when it is complete, drops the references its frame holds
    /// (freeing `alloc` blocks nobody holds any more), in one critical section. Returns the
    /// block's `origin` word (whose acknowledgement this is).
    pub fn free_message(&self, message: SlabRef) -> Result<u32> {
        self.free_message_of(message, None, true)
            .map(|origin| origin.expect("a waiting free always frees"))
    }

    /// `free_message` if the heap lock is free now; `Ok(None)` (nothing done) otherwise.
    pub fn try_free_message(&self, message: SlabRef) -> Result<Option<u32>> {
        self.free_message_of(message, None, false)
    }

    /// `free_message` only if the block's owner word is still `owner` (a reaper's snapshot
    /// may be stale: the block may have been freed and handed out again since).
    pub fn free_message_owned_by(&self, message: SlabRef, owner: u64) -> Result<u32> {
        self.free_message_of(message, Some(owner), true)
            .map(|origin| origin.expect("a waiting free always frees"))
    }

    /// The heap lock, waiting for it (until the call's deadline) or (`wait == false`) only
    /// if it is free now (`None`).
    fn heap_guard(&self, wait: bool) -> Result<Option<crate::lock::LockGuard<'_>>> {
        if wait {
            self.lock(&self.control().heap_lock).map(Some)
        } else {
            Ok(self.try_lock_heap())
        }
    }

    fn free_message_of(
        &self,
        message: SlabRef,
        expected: Option<u64>,
        wait: bool,
    ) -> Result<Option<u32>> {
        let origin = {
            let Some(_guard) = self.heap_guard(wait)? else {
                return Ok(None);
            };
            let header = self.used_header(message, is_message, "a message")?;
            check_owner(message, header, expected)?;
            let origin = header.origin.load(Ordering::Relaxed);
            if is_complete_message(header.owner.load(Ordering::Relaxed)) {
                for buffer in self.frame_buffers_of(message) {
                    crate::failpoint!("free_message.dropping");
                    self.drop_reference_locked(buffer, 1);
                }
            }
            crate::failpoint!("free_message.freeing");
            self.free_locked(message)?;
            origin
        };
        self.notify_space();
        Ok(Some(origin))
    }

    /// Drops the creator's reference to an `alloc` block (its last view in the creating
    /// process died). Does nothing if it was dropped already.
    pub fn drop_creator(&self, block: SlabRef) -> Result<()> {
        self.drop_creator_of(block, None, true).map(drop)
    }

    /// `drop_creator` if the heap lock is free now; `Ok(false)` (nothing done) otherwise.
    pub fn try_drop_creator(&self, block: SlabRef) -> Result<bool> {
        self.drop_creator_of(block, None, false)
    }

    /// `drop_creator` only if the block's owner word is still `owner` (its creator died).
    pub fn drop_creator_owned_by(&self, block: SlabRef, owner: u64) -> Result<()> {
        self.drop_creator_of(block, Some(owner), true).map(drop)
    }

    fn drop_creator_of(&self, block: SlabRef, expected: Option<u64>, wait: bool) -> Result<bool> {
        {
            let Some(_guard) = self.heap_guard(wait)? else {
                return Ok(false);
            };
            let header = self.used_header(block, is_alloc, "an alloc buffer")?;
            check_owner(block, header, expected)?;
            if !refcount::orphan(header) {
                return Ok(true);
            }
            crate::failpoint!("drop_creator.dropping");
            self.drop_reference_locked(block, CREATOR);
        }
        self.notify_space();
        Ok(true)
    }

    /// Drops `amount` of an `alloc` block's `refs` (`refcount::drop_reference`) and frees
    /// it when nobody holds it any more. Heap lock held.
    fn drop_reference_locked(&self, block: SlabRef, amount: u32) {
        let Ok(header) = self.used_header(block, is_alloc, "an alloc buffer") else {
            return;
        };
        if refcount::drop_reference(header, amount) {
            let _ = self.free_locked(block);
        }
    }

    /// The `alloc` blocks the frame in `message` references (none if it is unreadable).
    fn frame_buffers_of(&self, message: SlabRef) -> Vec<SlabRef> {
        let Ok((header, address, capacity)) = self.content(message) else {
            return vec![];
        };
        let len = header.content_len.load(Ordering::Relaxed) as usize;
        if len > capacity {
            return vec![];
        }
        // SAFETY: `content` checked that the block's `capacity` bytes lie inside its mapped
        // segment, and `len <= capacity`. Other processes may write these bytes meanwhile:
        // `buffers_of` is a parser that tolerates any bytes, and its result is checked
        // block by block by whoever uses it.
        let frame = unsafe { std::slice::from_raw_parts(address, len) };
        (self.buffers_of)(frame)
    }

    /// Recomputes every `alloc` block's `refs` from the complete messages' frames and frees
    /// those nobody holds. Heap lock held (run after breaking it).
    pub(super) fn recount_buffer_refs(&self) {
        let used = self.used_blocks_locked();
        let mut counts: HashMap<u64, u32> = HashMap::new();
        for &(block, owner) in &used {
            if is_complete_message(owner) {
                for buffer in self.frame_buffers_of(block) {
                    *counts.entry(buffer.0).or_default() += 1;
                }
            }
        }
        for &(block, owner) in &used {
            if !is_alloc(owner) {
                continue;
            }
            let Ok(header) = self.header(block) else {
                continue;
            };
            // The creator's bit is dropped in the same critical section that turns the owner
            // word to ORPHAN, so only an ALLOC owner may still have it.
            let creator = match owner_kind(owner) {
                OWNER_ALLOC => header.refs.load(Ordering::Relaxed) & CREATOR,
                _ => 0,
            };
            let count = counts.get(&block.0).copied().unwrap_or(0);
            let refs = creator | count.min(CREATOR - 1);
            header.refs.store(refs, Ordering::Relaxed);
            let (_, state) = unpack(header.size_state.load(Ordering::Relaxed));
            if refs == 0 && state == STATE_USED {
                let _ = self.free_locked(block);
            }
        }
    }
}
