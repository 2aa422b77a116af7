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
//! - **Mailbox** (`FLAG_LATEST`): a ring of one cell; publishing retires the previous
//!   version, and readers take the newest.
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

/// A pin: which subscriber (and generation) the ticket with `token` keeps alive.
fn pin(token: u32, id: SubscriberId) -> u64 {
    u64::from(token) << 32 | u64::from(id.generation & 0xffff) << 16 | u64::from(id.index)
}

impl Channel {
    pub fn kind(&self) -> Kind {
        Kind::from_flags(self.control().flags.load(Ordering::Relaxed))
    }

    fn holds(&self) -> std::sync::MutexGuard<'_, LocalHolds> {
        self.holds
            .lock()
            .unwrap_or_else(|poison| poison.into_inner())
    }

    /// Forgets the parent's holds in a fork child (it holds nothing under its own slot).
    pub(super) fn forget_holds(&self) {
        if let Ok(mut holds) = self.holds.try_lock() {
            *holds = LocalHolds::default();
        }
    }

    /// The ring lock, sweeping first if a dead holder left it broken.
    fn fan_out_lock(&self) -> Result<LockGuard<'_>> {
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

    fn prefix(&self, block: SlabRef) -> Result<&SharedPrefix> {
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
    fn retained(&self, block: SlabRef, prefix: &SharedPrefix) -> bool {
        let ring = self.ring();
        let seq = prefix.seq.load(Ordering::Relaxed);
        let (head, tail) = ring.positions();
        (head..tail).contains(&seq) && ring.block_at(seq) == block.0
    }

    /// Frees a shared block that is neither retained nor held. Ring lock held. `wait`: the
    /// free may wait for the heap lock (a call, or a deferred release); else (a destructor)
    /// a busy heap lock defers it. A free that cannot finish (the wait timed out) leaves the
    /// block to the next sweep.
    fn free_if_unused(&self, block: SlabRef, wait: bool) {
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
            if let Ok(None) = self.slab.try_free_message(block) {
                self.defer(receive::Deferred::FreeShared(block));
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
    fn sweep(&self) {
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

    // ---- subscribers ----

    fn entry(&self, index: u16) -> &SubscriberEntry {
        &self.control().fan_out.subscribers[usize::from(index)]
    }

    fn entries(&self) -> impl Iterator<Item = (u16, &SubscriberEntry)> {
        let fan_out = &self.control().fan_out;
        let used = (fan_out.subscribers_used.load(Ordering::Relaxed) as usize).min(MAX_SUBSCRIBERS);
        fan_out.subscribers[..used]
            .iter()
            .enumerate()
            .map(|(index, entry)| (index as u16, entry))
    }

    fn is_current(&self, id: SubscriberId) -> bool {
        self.entry(id.index).state.load(Ordering::Relaxed) == active(id.generation)
    }

    /// True while a subscriber counts: a process has it open, or a pickled handle of it
    /// is on its way to one. Ring lock held.
    fn entry_alive(&self, index: u16, entry: &SubscriberEntry) -> bool {
        let state = entry.state.load(Ordering::Relaxed);
        if state & 1 == 0 {
            return false;
        }
        if any_bit(&entry.holders) {
            return true;
        }
        let id = SubscriberId {
            index,
            generation: state >> 1,
        };
        let control = self.control();
        control.fan_out.pins.iter().enumerate().any(|(cell, word)| {
            let word = word.load(Ordering::Relaxed);
            word != 0
                && word & 0xffff_ffff == pin(0, id)
                && control.pending_token(cell) == (word >> 32) as u32
        })
    }

    /// Frees the entries nobody holds any more. Ring lock held.
    fn drop_dead_entries(&self) {
        for (index, entry) in self.entries() {
            let state = entry.state.load(Ordering::Relaxed);
            if state & 1 != 0 && !self.entry_alive(index, entry) {
                entry.state.store(state & !1, Ordering::Relaxed);
            }
        }
    }

    /// A new subscriber, starting at the next message published, held by this process.
    pub fn subscribe(&self) -> Result<SubscriberId> {
        if !matches!(self.kind(), Kind::Broadcast { .. }) {
            return Err(Error::InvalidArgument(
                "subscribe() needs a broadcast channel".into(),
            ));
        }
        let fan_out = &self.control().fan_out;
        let _guard = self.fan_out_lock()?;
        self.drop_dead_entries();
        let free = fan_out
            .subscribers
            .iter()
            .position(|entry| entry.state.load(Ordering::Relaxed) & 1 == 0)
            .ok_or_else(|| {
                Error::Limit(format!(
                    "a broadcast channel may have at most {MAX_SUBSCRIBERS} subscribers"
                ))
            })?;
        let entry = &fan_out.subscribers[free];
        let generation = ((entry.state.load(Ordering::Relaxed) >> 1) + 1) & 0x7fff_ffff;
        let generation = generation.max(1);
        for word in &entry.holders {
            word.store(0, Ordering::Relaxed);
        }
        entry
            .cursor
            .store(self.ring().positions().1, Ordering::Relaxed);
        entry.missed.store(0, Ordering::Relaxed);
        set_bit(&entry.holders, self.slot());
        entry.state.store(active(generation), Ordering::Relaxed);
        fan_out
            .subscribers_used
            .fetch_max(free as u32 + 1, Ordering::Relaxed);
        self.holds().subscribers.insert(free as u16, 1);
        Ok(SubscriberId {
            index: free as u16,
            generation,
        })
    }

    /// Counts another handle of subscriber `id` in this process (a copy made here, or one
    /// that arrived from another process). `Closed` if the subscriber is gone.
    pub fn open_subscriber(&self, id: SubscriberId) -> Result<()> {
        let _guard = self.fan_out_lock()?;
        if !self.is_current(id) {
            return Err(Error::Closed(
                "this subscriber was closed (every handle of it was dropped) before this process opened it".into(),
            ));
        }
        let mut holds = self.holds();
        let count = holds.subscribers.entry(id.index).or_insert(0);
        if *count == 0 {
            set_bit(&self.entry(id.index).holders, self.slot());
        }
        *count += 1;
        Ok(())
    }

    /// Uncounts a handle of subscriber `id` in this process; the last one here lets go of
    /// it (and a subscriber nobody holds stops counting). Never waits long: if the ring
    /// lock is busy, the close is deferred.
    pub fn close_subscriber(&self, id: SubscriberId) {
        if !self.owned_here() {
            return;
        }
        match self.slab.try_lock_ring() {
            Some(guard) => {
                self.close_subscriber_locked(id, false);
                drop(guard);
                self.wake_publishers();
            }
            None => self.defer(receive::Deferred::CloseSubscriber(id)),
        }
    }

    pub(super) fn close_subscriber_locked(&self, id: SubscriberId, wait: bool) {
        let mut holds = self.holds();
        let Some(count) = holds.subscribers.get_mut(&id.index) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        holds.subscribers.remove(&id.index);
        drop(holds);
        if self.is_current(id) {
            clear_bit(&self.entry(id.index).holders, self.slot());
        }
        self.drop_dead_entries();
        self.retire_read(wait);
    }

    /// Keeps subscriber `id` alive while the ticket `pending` is on its way (see
    /// `FanOut::pins`).
    pub fn pin_subscriber(&self, id: SubscriberId, pending: u64) -> Result<()> {
        let control = self.control();
        let _guard = self.fan_out_lock()?;
        if let Some(cell) = control.pending_cell(pending) {
            control.fan_out.pins[cell]
                .store(pin(ControlBlock::token_of(pending), id), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Messages subscriber `id` skipped (the publisher dropped them before it read them).
    pub fn missed(&self, id: SubscriberId) -> u64 {
        self.entry(id.index).missed.load(Ordering::Relaxed)
    }

    /// Messages published and not yet read by subscriber `id`.
    pub fn backlog(&self, id: SubscriberId) -> u64 {
        let (head, tail) = self.ring().positions();
        tail.saturating_sub(
            self.entry(id.index)
                .cursor
                .load(Ordering::Relaxed)
                .max(head),
        )
    }

    /// Retires the messages every live subscriber has read (a broadcast channel that
    /// waits for its subscribers). Ring lock held; `wait` as for `free_if_unused`. True if
    /// any was retired.
    fn retire_read(&self, wait: bool) -> bool {
        if self.kind() != (Kind::Broadcast { drop_oldest: false }) {
            return false;
        }
        let ring = self.ring();
        let (head, tail) = ring.positions();
        let slowest = self
            .entries()
            .filter(|(index, entry)| self.entry_alive(*index, entry))
            .map(|(_, entry)| entry.cursor.load(Ordering::Relaxed))
            .min()
            .unwrap_or(tail)
            .min(tail);
        for _ in head..slowest {
            self.evict_oldest(wait);
        }
        slowest > head
    }

    /// Retires the oldest retained message, freeing it unless someone holds it. Ring lock
    /// held.
    fn evict_oldest(&self, wait: bool) {
        if let Some(entry) = self.ring().pop() {
            crate::failpoint!("fanout.evicted");
            self.free_if_unused(SlabRef(entry.block), wait);
        }
    }

    fn wake_publishers(&self) {
        let ring = &self.control().ring;
        // SeqCst: pairs with the SeqCst waiter registration in `wait_until`.
        ring.popped.fetch_add(1, Ordering::SeqCst);
        if ring.producers_waiting.load(Ordering::SeqCst) > 0 {
            futex_wake(&ring.popped, i32::MAX);
        }
    }

    // ---- publishing ----

    /// Allocates a block for a frame of `frame_len` bytes plus the prefix, waiting for
    /// memory while `deadline` allows; the frame goes at `address + SHARED_PREFIX_LEN`.
    pub fn begin_publish(
        &self,
        frame_len: usize,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Allocation> {
        let _scope = call_scope(deadline, TimeoutKind::Full);
        self.run_deferred();
        self.ensure_receivers()?;
        let len = frame_len.checked_add(SHARED_PREFIX_LEN).ok_or_else(|| {
            Error::InvalidArgument(format!("a message of {frame_len} bytes is too large"))
        })?;
        self.allocate(len, OWNER_SENDER, block, deadline, interrupt)
    }

    /// Publishes a filled block (its frame after the prefix) to every subscriber, or as
    /// the newest version; returns its sequence number. Waits for the slowest subscriber
    /// only in a broadcast channel without `drop_oldest`. On error the block is still the
    /// caller's (`abort_put`).
    pub fn publish_shared(
        &self,
        allocation: &Allocation,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<u64> {
        let _scope = call_scope(deadline, TimeoutKind::Full);
        let mut published = self.try_publish_shared(allocation)?;
        if published.is_none() && block {
            let ring_state = &self.control().ring;
            published = self.wait_until(
                &ring_state.popped,
                &ring_state.producers_waiting,
                deadline,
                interrupt,
                || {
                    self.ensure_receivers()?;
                    self.try_publish_shared(allocation)
                },
            )?;
        }
        let Some(seq) = published else {
            return Err(Error::Full(format!(
                "broadcast channel full: its {} retained messages are not all read by the slowest subscriber",
                self.ring().capacity()
            )));
        };
        let ring = &self.control().ring;
        // SeqCst: pairs with the SeqCst waiter registration in `wait_until`.
        ring.pushed.fetch_add(1, Ordering::SeqCst);
        if ring.consumers_waiting.load(Ordering::SeqCst) > 0 {
            futex_wake(&ring.pushed, i32::MAX);
        }
        Ok(seq)
    }

    fn try_publish_shared(&self, allocation: &Allocation) -> Result<Option<u64>> {
        let me = self.slab.slot_id();
        let prefix = self.prefix(allocation.block)?;
        let header = self.slab.header(allocation.block)?;
        let _guard = self.fan_out_lock()?;
        let ring = self.ring();
        if ring.is_full() {
            self.retire_read(true);
        }
        if ring.is_full() {
            if self.kind() == (Kind::Broadcast { drop_oldest: false }) {
                return Ok(None);
            }
            self.evict_oldest(true);
        }
        let seq = ring.positions().1;
        prefix.seq.store(seq, Ordering::Relaxed);
        for word in &prefix.holders {
            word.store(0, Ordering::Relaxed);
        }
        // Shared before pushed, both under the ring lock: if we die in between, the block
        // is an unretained, unheld shared block, and the sweep frees it.
        header
            .owner
            .store(owner_word(OWNER_SHARED, me), Ordering::Relaxed);
        crate::failpoint!("fanout.shared_before_push");
        ring.push(Entry {
            block: allocation.block.0,
            origin: u32::from(me.index),
        });
        Ok(Some(seq))
    }

    // ---- receiving ----

    /// Takes the next message of subscriber `id`, waiting while `deadline` allows.
    pub fn receive_subscriber(
        &self,
        id: SubscriberId,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Received> {
        let _scope = call_scope(deadline, TimeoutKind::Empty);
        self.run_deferred();
        let attempt = || -> Result<Option<Received>> {
            if let Some(received) = self.try_take(id)? {
                return Ok(Some(received));
            }
            if !self.any_open(Side::Sender) {
                return self
                    .try_take(id)?
                    .map(Some)
                    .ok_or_else(|| self.side_gone(Side::Sender));
            }
            Ok(None)
        };
        let ring_state = &self.control().ring;
        let received = match attempt()? {
            Some(received) => Some(received),
            None if !block => return Err(Error::Empty("no new message".into())),
            None => match self.spin(|_| self.backlog(id) > 0, || self.try_take(id))? {
                Some(received) => Some(received),
                None => self.wait_until(
                    &ring_state.pushed,
                    &ring_state.consumers_waiting,
                    deadline,
                    interrupt,
                    attempt,
                )?,
            },
        };
        received.ok_or_else(|| Error::Empty("no message arrived before the timeout".into()))
    }

    fn try_take(&self, id: SubscriberId) -> Result<Option<Received>> {
        let _ = self.slab.attach_all();
        let (taken, retired) = {
            let _guard = self.fan_out_lock()?;
            if !self.is_current(id) {
                return Err(Error::Closed("this subscriber was closed".into()));
            }
            let entry = self.entry(id.index);
            let ring = self.ring();
            let (head, tail) = ring.positions();
            let mut cursor = entry.cursor.load(Ordering::Relaxed);
            if cursor < head {
                entry.missed.fetch_add(head - cursor, Ordering::Relaxed);
                cursor = head;
                entry.cursor.store(cursor, Ordering::Relaxed);
            }
            if cursor >= tail {
                return Ok(None);
            }
            let block = SlabRef(ring.block_at(cursor));
            self.hold(block)?;
            crate::failpoint!("fanout.held_before_cursor");
            entry.cursor.store(cursor + 1, Ordering::Relaxed);
            (block, cursor == head && self.retire_read(true))
        };
        if retired {
            self.wake_publishers();
        }
        self.received(taken).map(Some)
    }

    /// The newest version of a mailbox, once it is newer than `newer_than`: `(version,
    /// message)`, versions counting from 1.
    pub fn receive_latest(
        &self,
        newer_than: u64,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<(u64, Received)> {
        let _scope = call_scope(deadline, TimeoutKind::Empty);
        self.run_deferred();
        let attempt = || -> Result<Option<(u64, Received)>> {
            if let Some(taken) = self.try_take_latest(newer_than)? {
                return Ok(Some(taken));
            }
            if !self.any_open(Side::Sender) {
                return self
                    .try_take_latest(newer_than)?
                    .map(Some)
                    .ok_or_else(|| self.side_gone(Side::Sender));
            }
            Ok(None)
        };
        let ring_state = &self.control().ring;
        let taken = match attempt()? {
            Some(taken) => Some(taken),
            None => match self.spin(
                |ring| ring.positions().1 > newer_than,
                || self.try_take_latest(newer_than),
            )? {
                Some(taken) => Some(taken),
                None => self.wait_until(
                    &ring_state.pushed,
                    &ring_state.consumers_waiting,
                    deadline,
                    interrupt,
                    attempt,
                )?,
            },
        };
        taken.ok_or_else(|| {
            Error::Empty(format!(
                "no version newer than {newer_than} was published before the timeout"
            ))
        })
    }

    /// The newest published version number (0 before the first).
    pub fn latest_version(&self) -> u64 {
        self.ring().positions().1
    }

    fn try_take_latest(&self, newer_than: u64) -> Result<Option<(u64, Received)>> {
        if self.ring().positions().1 <= newer_than {
            return Ok(None);
        }
        let _ = self.slab.attach_all();
        let (version, block) = {
            let _guard = self.fan_out_lock()?;
            let ring = self.ring();
            let (head, tail) = ring.positions();
            if tail <= newer_than || head == tail {
                return Ok(None);
            }
            let block = SlabRef(ring.block_at(tail - 1));
            self.hold(block)?;
            (tail, block)
        };
        Ok(Some((version, self.received(block)?)))
    }

    /// Adds a hold of this process on `block` (its bit, when this is the first). Ring lock
    /// held.
    fn hold(&self, block: SlabRef) -> Result<()> {
        let prefix = self.prefix(block)?;
        let mut holds = self.holds();
        let count = holds.messages.entry(block.0).or_insert(0);
        if *count == 0 {
            set_bit(&prefix.holders, self.slot());
        }
        *count += 1;
        Ok(())
    }

    /// The frame of a held shared block. On a corrupt block the hold is dropped again.
    fn received(&self, block: SlabRef) -> Result<Received> {
        let described = self
            .slab
            .content(block)
            .and_then(|(header, address, capacity)| {
                let len = (header.content_len.load(Ordering::Relaxed) as usize).min(capacity);
                let frame_len = len.checked_sub(SHARED_PREFIX_LEN).ok_or_else(|| {
                    Error::Incompatible(format!(
                    "broadcast message {:#x} is shorter than its prefix (corrupt block header?)",
                    block.0
                ))
                })?;
                Ok(Received {
                    block,
                    // SAFETY: `len` >= 64 bytes of content lie at `address` (checked above).
                    address: unsafe { address.add(SHARED_PREFIX_LEN) },
                    len: frame_len,
                })
            });
        if described.is_err() {
            self.release_shared(block);
        }
        described
    }

    /// Drops one hold of this process on a shared block (the last view of a message
    /// died); the last hold of the last holder frees it once it is not retained. Never
    /// waits long: with the ring lock busy, the release is deferred.
    pub(super) fn release_shared(&self, block: SlabRef) {
        match self.slab.try_lock_ring() {
            Some(_guard) => self.release_shared_locked(block, false),
            None => self.defer(receive::Deferred::Shared(block)),
        }
    }

    /// `release_shared` with the ring lock held; `wait`: the free may wait for the heap
    /// lock (else, with it busy, the free is deferred).
    pub(super) fn release_shared_locked(&self, block: SlabRef, wait: bool) {
        let mut holds = self.holds();
        let Some(count) = holds.messages.get_mut(&block.0) else {
            return;
        };
        *count -= 1;
        if *count > 0 {
            return;
        }
        holds.messages.remove(&block.0);
        drop(holds);
        let Ok(prefix) = self.prefix(block) else {
            return;
        };
        clear_bit(&prefix.holders, self.slot());
        if self.retained(block, prefix) || any_bit(&prefix.holders) {
            return;
        }
        self.free_if_unused(block, wait);
    }

    /// Runs a deferred fan-out release, waiting for the ring lock.
    pub(super) fn run_fan_out(&self, release: receive::Deferred) -> Result<()> {
        let guard = self.fan_out_lock()?;
        match release {
            receive::Deferred::Shared(block) => self.release_shared_locked(block, true),
            receive::Deferred::FreeShared(block) => self.free_if_unused(block, true),
            receive::Deferred::CloseSubscriber(id) => self.close_subscriber_locked(id, true),
            _ => {}
        }
        drop(guard);
        self.wake_publishers();
        Ok(())
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
        for block in shared {
            self.free_if_unused(SlabRef(block), true);
        }
        drop(guard);
        self.wake_publishers();
        true
    }
}
