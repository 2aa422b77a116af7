//! Broadcast channels and latest-value mailboxes: each message is copied into the slab
//! once and read by many.
//!
//! Both reuse a channel's control block, slab, process slots and handle counting
//! (publishers and writers are senders, subscribers and readers receivers); what differs
//! is who holds a message. The ring holds the *retained* messages (ring positions
//! `head..tail` are their sequence numbers), and a message's block starts with a
//! [`SharedPrefix`] naming, one bit per process slot, the processes that hold views of
//! it. A block is freed when it is neither retained nor held by anyone.
//!
//! - **Broadcast**: each subscriber is an entry with its own cursor (the sequence number it
//!   reads next), shared by every handle of it in every process: two processes using one
//!   subscriber split its messages between them. A message is retained until every live
//!   subscriber has read it (`overflow="block"`: the publisher waits for room), or until a
//!   new message needs its cell (`FLAG_DROP_OLDEST`: a subscriber that fell behind skips
//!   to the oldest retained message and counts what it missed).
//! - **Mailbox** (`FLAG_LATEST`): a ring of two cells; publishing pushes the new version,
//!   then retires the previous one (so a writer killed in between leaves two, never none),
//!   and readers take the newest.
//!
//! Every change to the ring, the subscriber entries and the prefixes' holder bits happens
//! under the ring lock, and every fact they record is derived from them again on recovery:
//! a process that dies holding the lock leaves `FanOut::needs_sweep` set by whoever broke
//! the lock, and the next holder frees every shared block that is neither retained nor
//! held ([`Channel::sweep`]). A dead process's bits (in subscriber entries and prefixes) are
//! cleared by its reaper before its slot can be reused, so a bit always names a live
//! process or one not yet reaped. Freeing nests the heap lock inside the ring lock (the
//! only order in which both are ever held).
use std::collections::{HashMap, HashSet};

mod flow;
mod subscribers;

use super::*;
use crate::layout::{
    SharedPrefix, SubscriberEntry, FLAG_BROADCAST, FLAG_DROP_OLDEST, FLAG_LATEST, MAX_SUBSCRIBERS,
    SHARED_PREFIX_LEN,
};
use crate::lock::LockGuard;
use crate::procs::SlotId;
use crate::slab::block::{owner_kind, OWNER_SHARED};

/// What kind of channel a control block is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Channel,
    Broadcast { drop_oldest: bool },
    Latest,
}

impl Kind {
    pub fn flags(self) -> u32 {
        match self {
            Kind::Channel => 0,
            Kind::Broadcast { drop_oldest: false } => FLAG_BROADCAST,
            Kind::Broadcast { drop_oldest: true } => FLAG_BROADCAST | FLAG_DROP_OLDEST,
            Kind::Latest => FLAG_LATEST,
        }
    }

    pub fn from_flags(flags: u32) -> Kind {
        if flags & FLAG_LATEST != 0 {
            Kind::Latest
        } else if flags & FLAG_BROADCAST != 0 {
            Kind::Broadcast {
                drop_oldest: flags & FLAG_DROP_OLDEST != 0,
            }
        } else {
            Kind::Channel
        }
    }

    /// True for broadcast channels and mailboxes.
    pub fn fans_out(self) -> bool {
        self != Kind::Channel
    }
}

/// A subscriber entry and the generation it had when the handle was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SubscriberId {
    pub index: u16,
    pub generation: u32,
}

/// This process's share of the holder bits: how many of its views hold each message, and
/// how many of its handles hold each subscriber (a bit is set while its count is > 0).
#[derive(Default)]
pub(super) struct LocalHolds {
    messages: HashMap<u64, u32>,
    subscribers: HashMap<u16, u32>,
    /// Pending entries made at a fork in progress, one per subscriber held here: each pins
    /// its subscriber until the child has taken hold of it (see `pin_for_fork`).
    fork_pins: Vec<(u64, SubscriberId)>,
    /// Fan-out releases that found the ring lock busy (here rather than in the channel's
    /// `deferred` list: this lock can always be had, even in a fork child).
    deferred: Vec<receive::Deferred>,
}

/// The lock of this process's `LocalHolds`. Not a `Mutex`: a fork child must be able to
/// take it even if a thread of the parent (which does not exist in the child) held it at
/// the fork. It is only ever held for a few map operations, never across a wait.
pub(in crate::channel) struct HoldsLock {
    locked: std::sync::atomic::AtomicBool,
    holds: std::cell::UnsafeCell<LocalHolds>,
}

// SAFETY: `holds` is only reached through a `HoldsGuard`, and at most one guard exists at a
// time (`locked` is taken by compare-exchange), except in `reset_in_child`, which runs
// while the process has a single thread.
unsafe impl Sync for HoldsLock {}

impl Default for HoldsLock {
    fn default() -> HoldsLock {
        HoldsLock {
            locked: std::sync::atomic::AtomicBool::new(false),
            holds: std::cell::UnsafeCell::new(LocalHolds::default()),
        }
    }
}

impl HoldsLock {
    fn lock(&self) -> HoldsGuard<'_> {
        // Acquire: pairs with the Release in `HoldsGuard::drop`.
        while self
            .locked
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            std::thread::yield_now();
        }
        HoldsGuard { lock: self }
    }

    /// The holds in a fork child, whoever held the lock in the parent (see
    /// `reset_in_child`).
    fn lock_in_child(&self) -> HoldsGuard<'_> {
        self.locked.store(false, Ordering::Release);
        self.lock()
    }

    /// Empties the holds and frees the lock. Only in a fork child, before it starts any
    /// thread: whoever held the lock does not exist there.
    fn reset_in_child(&self) {
        // SAFETY: the child has one thread, running this: no guard is alive in it. The old
        // maps are leaked, not dropped: a parent thread may have been changing them.
        let old = unsafe { std::ptr::replace(self.holds.get(), LocalHolds::default()) };
        std::mem::forget(old);
        self.locked.store(false, Ordering::Release);
    }
}

pub(in crate::channel) struct HoldsGuard<'a> {
    lock: &'a HoldsLock,
}

impl std::ops::Deref for HoldsGuard<'_> {
    type Target = LocalHolds;
    fn deref(&self) -> &LocalHolds {
        // SAFETY: this guard owns the lock (see `HoldsLock::lock`).
        unsafe { &*self.lock.holds.get() }
    }
}

impl std::ops::DerefMut for HoldsGuard<'_> {
    fn deref_mut(&mut self) -> &mut LocalHolds {
        // SAFETY: this guard owns the lock, and `&mut self` makes this the only reference.
        unsafe { &mut *self.lock.holds.get() }
    }
}

impl Drop for HoldsGuard<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire in `HoldsLock::lock`.
        self.lock.locked.store(false, Ordering::Release);
    }
}

fn bit_of(slot: u16) -> (usize, u64) {
    (usize::from(slot) / 64, 1u64 << (slot % 64))
}

// The holder words are only read and written under the ring lock, whose Acquire/Release
// orders them: Relaxed is enough.
fn set_bit(words: &[AtomicU64; 4], slot: u16) {
    let (word, bit) = bit_of(slot);
    words[word].fetch_or(bit, Ordering::Relaxed);
}

fn clear_bit(words: &[AtomicU64; 4], slot: u16) {
    let (word, bit) = bit_of(slot);
    words[word].fetch_and(!bit, Ordering::Relaxed);
}

fn any_bit(words: &[AtomicU64; 4]) -> bool {
    words.iter().any(|word| word.load(Ordering::Relaxed) != 0)
}

/// An entry's state word while active: `generation:31 | 1`.
fn active(generation: u32) -> u32 {
    generation << 1 | 1
}

/// A pin: which subscriber (and generation) the ticket with `token` keeps alive:
/// `token:23 << 40 | generation:31 << 8 | index` (an index is below `MAX_SUBSCRIBERS`).
fn pin(token: u32, id: SubscriberId) -> u64 {
    u64::from(token) << 40 | u64::from(id.generation & 0x7fff_ffff) << 8 | u64::from(id.index)
}

const _: () = assert!(MAX_SUBSCRIBERS <= 256);

/// The token a pin names.
fn pin_token(word: u64) -> u32 {
    (word >> 40) as u32
}

/// A pin without its token: whom it pins.
fn pinned(word: u64) -> u64 {
    word & ((1 << 40) - 1)
}

impl Channel {
    pub fn kind(&self) -> Kind {
        Kind::from_flags(self.control().flags.load(Ordering::Relaxed))
    }

    pub(in crate::channel) fn holds(&self) -> HoldsGuard<'_> {
        self.holds.lock()
    }

    /// Forgets the parent's holds in a fork child (it holds nothing under its own slot);
    /// returns the pending entries that pin the subscribers it inherited, with them.
    pub(super) fn forget_holds(&self) -> Vec<(u64, SubscriberId)> {
        let pins = std::mem::take(&mut self.holds.lock_in_child().fork_pins);
        self.holds.reset_in_child();
        pins
    }

    /// Before a fork: pins every subscriber this process holds with a pending entry of its
    /// own, so that the parent closing its handles right after the fork does not end a
    /// subscriber the child is about to take hold of (the child redeems the entries once it
    /// has, see `registry::after_fork_in_child`).
    pub(super) fn pin_for_fork(&self) {
        let Ok(_guard) = self.fan_out_lock() else {
            return;
        };
        let mut holds = self.holds();
        let control = self.control();
        let held: Vec<u16> = holds.subscribers.keys().copied().collect();
        for index in held {
            let state = self.entry(index).state.load(Ordering::Relaxed);
            let id = SubscriberId {
                index,
                generation: state >> 1,
            };
            let Ok(entry) = control.add_pending(self.slab.slot_id(), 0, 0, random_u64() as u32)
            else {
                break;
            };
            if let Some(cell) = control.pending_cell(entry) {
                control.fan_out.pins[cell]
                    .store(pin(ControlBlock::token_of(entry), id), Ordering::Relaxed);
            }
            holds.fork_pins.push((entry, id));
        }
    }

    /// Queues a fan-out release that found the ring lock busy (or, for `FreeShared`, the
    /// heap lock while holding the ring lock); the watcher runs it soon after.
    pub(in crate::channel) fn defer_fan_out(&self, release: receive::Deferred) {
        self.holds().deferred.push(release);
        // The watchers sleep on this word: wake ours to run it now.
        futex_wake(&self.control().heap.segment_count, i32::MAX);
    }

    /// The fan-out releases deferred so far (see `defer_fan_out`).
    pub(in crate::channel) fn take_fan_out_deferred(&self) -> Vec<receive::Deferred> {
        std::mem::take(&mut self.holds().deferred)
    }

    /// True while fan-out releases wait for the watcher's next run.
    pub(in crate::channel) fn has_fan_out_deferred(&self) -> bool {
        !self.holds().deferred.is_empty()
    }

    /// After a fork, in the parent: the child (if any) redeems the pins.
    pub(super) fn forget_fork_pins(&self) {
        self.holds().fork_pins.clear();
    }

    /// The ring lock, sweeping first if a dead holder left it broken.
    pub(crate) fn fan_out_lock(&self) -> Result<LockGuard<'_>> {
        let guard = self.slab.lock(&self.control().ring_lock)?;
        // Acquire: pairs with the Release store in `Slab::lock` when breaking the lock.
        if self
            .control()
            .fan_out
            .needs_sweep
            .swap(0, Ordering::Acquire)
            != 0
        {
            self.sweep();
        }
        Ok(guard)
    }

    pub(crate) fn prefix(&self, block: SlabRef) -> Result<&SharedPrefix> {
        let (_, address, capacity) = self.slab.content(block)?;
        if capacity < SHARED_PREFIX_LEN {
            return Err(Error::Incompatible(format!(
                "slab block {:#x} is too small for a broadcast message (corrupt descriptor?)",
                block.0
            )));
        }
        // SAFETY: the block is in use and holds `capacity` >= 64 bytes after its header, at
        // a 64-byte aligned address (blocks are 64-byte aligned, headers 64 bytes long);
        // every field of the prefix is an atomic, valid for any bit pattern.
        Ok(unsafe { &*address.cast::<SharedPrefix>() })
    }

    /// True when `block` is the message at its own sequence number in the ring.
    pub(crate) fn retained(&self, block: SlabRef, prefix: &SharedPrefix) -> bool {
        let ring = self.ring();
        let seq = prefix.seq.load(Ordering::Relaxed);
        let (head, tail) = ring.positions();
        (head..tail).contains(&seq) && ring.block_at(seq) == block.0
    }

    /// Frees a shared block that is neither retained nor held. Ring lock held. `wait`: the
    /// free may wait for the heap lock (a call, or a deferred release); else (a destructor)
    /// a busy heap lock defers it. A free that cannot finish (the wait timed out) leaves the
    /// block to the next sweep.
    pub(crate) fn free_if_unused(&self, block: SlabRef, wait: bool) {
        let Ok(header) = self.slab.header(block) else {
            return;
        };
        if owner_kind(header.owner.load(Ordering::Relaxed)) != OWNER_SHARED {
            return;
        }
        let Ok(prefix) = self.prefix(block) else {
            return;
        };
        if self.retained(block, prefix) || any_bit(&prefix.holders) {
            return;
        }
        crate::failpoint!("fanout.freeing");
        if !wait {
            match self.slab.try_free_message(block) {
                Ok(Some(_)) => {}
                Ok(None) => self.defer_fan_out(receive::Deferred::FreeShared(block)),
                // Release: pairs with the Acquire swap in `fan_out_lock`.
                Err(_) => self
                    .control()
                    .fan_out
                    .needs_sweep
                    .store(1, Ordering::Release),
            }
            return;
        }
        if self.slab.free_message(block).is_err() {
            // Release: pairs with the Acquire swap in `fan_out_lock`.
            self.control()
                .fan_out
                .needs_sweep
                .store(1, Ordering::Release);
        }
    }

    /// Frees every shared block that is neither retained nor held: what a process that
    /// died holding the ring lock (or a free that timed out) left behind. Ring lock held.
    pub(crate) fn sweep(&self) {
        let done = self.slab.attach_all().is_ok()
            && match self.slab.used_blocks() {
                Ok(used) => {
                    for (block, owner) in used {
                        if owner_kind(owner) == OWNER_SHARED {
                            self.free_if_unused(block, true);
                        }
                    }
                    true
                }
                Err(_) => false,
            };
        if !done {
            // The next holder tries again. Release: pairs with `fan_out_lock`.
            self.control()
                .fan_out
                .needs_sweep
                .store(1, Ordering::Release);
        }
    }

    /// A dead process's share of a fan-out channel: its bits in subscriber entries and
    /// message prefixes, then whatever that leaves unused. Idempotent. False when a lock
    /// wait timed out (the reap resumes later).
    pub(super) fn reclaim_fan_out(&self, dead: SlotId) -> bool {
        let Ok(guard) = self.fan_out_lock() else {
            return false;
        };
        if self.slab.attach_all().is_err() {
            return false;
        }
        let Ok(used) = self.slab.used_blocks() else {
            return false;
        };
        for (_, entry) in self.entries() {
            clear_bit(&entry.holders, dead.index);
        }
        let shared: HashSet<u64> = used
            .iter()
            .filter(|(_, owner)| owner_kind(*owner) == OWNER_SHARED)
            .map(|(block, _)| block.0)
            .collect();
        for &block in &shared {
            if let Ok(prefix) = self.prefix(SlabRef(block)) {
                clear_bit(&prefix.holders, dead.index);
            }
            crate::failpoint!("fanout.reclaim_block");
        }
        self.drop_dead_entries();
        self.retire_read(true);
        self.retire_older_versions();
        for block in shared {
            self.free_if_unused(SlabRef(block), true);
        }
        drop(guard);
        self.wake_publishers();
        true
    }
}
