//! Receiving: taking a message off the ring (spinning, then sleeping), releasing it when
//! its last view is gone, and counting acknowledgements for its sender.

use super::*;

/// A release that found the heap lock taken. Destructors (the last view of a message
/// dying, with the GIL held) must not wait for another process's critical section, so the
/// release is queued here and run soon after by this process (see `run_deferred`). The
/// block stays owned by this process meanwhile: if it dies, its reaper frees it.
#[derive(Clone, Copy)]
pub(super) enum Deferred {
    Message(SlabRef),
    /// The block of a put that did not happen: freed with no acknowledgement counted.
    Abandoned(SlabRef),
    Creator(SlabRef),
    /// A hold on a broadcast or mailbox message (see `fanout`).
    Shared(SlabRef),
    /// A shared block found unused whose free found the heap lock taken.
    FreeShared(SlabRef),
    CloseSubscriber(crate::channel::SubscriberId),
}

impl Channel {
    /// Takes the next message, waiting while `deadline` allows.
    pub fn receive(
        &self,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Received> {
        let _scope = call_scope(deadline, TimeoutKind::Empty);
        self.run_deferred();
        if let Some(received) = self.try_pop()? {
            return Ok(received);
        }
        if !self.any_open(Side::Sender) {
            return self.try_pop()?.ok_or_else(|| self.side_gone(Side::Sender));
        }
        if !block {
            return Err(Error::Empty("channel is empty".into()));
        }
        let waiting = Some(&self.control().ring.consumers_waiting);
        if let Some(received) = self.spin(
            waiting,
            deadline,
            &mut *interrupt,
            |ring| !ring.is_empty(),
            || self.try_pop(),
        )? {
            return Ok(received);
        }
        let ring_state = &self.control().ring;
        let received = self.wait_until(
            &ring_state.pushed,
            &ring_state.consumers_waiting,
            deadline,
            interrupt,
            || {
                if let Some(received) = self.try_pop()? {
                    return Ok(Some(received));
                }
                if !self.any_open(Side::Sender) {
                    return self
                        .try_pop()?
                        .map(Some)
                        .ok_or_else(|| self.side_gone(Side::Sender));
                }
                Ok(None)
            },
        )?;
        received.ok_or_else(|| Error::Empty("no message arrived before the timeout".into()))
    }

    /// Takes the next message as [`receive`](Self::receive) does, then up to `max - 1`
    /// more that are already queued (and no more than the ring holds), up to 64 per hold
    /// of the ring lock (one wake-up of waiting producers per hold).
    pub fn receive_many(
        &self,
        max: usize,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Vec<Received>> {
        let first = self.receive(block, deadline, interrupt)?;
        // No more than a ring holds, whatever `max` asks and whatever length `head` and
        // `tail` (shared memory a corrupt peer may have written) claim.
        let max = max.min(self.capacity.max(1));
        let queued = self.ring().len().min(self.capacity as u64) as usize;
        let mut received = Vec::with_capacity(max.min(queued + 1));
        received.push(first);
        if max > 1 {
            // What was popped stays popped: an error here only ends the batch early.
            let _ = self.try_pop_more(max - 1, &mut received);
        }
        Ok(received)
    }

    /// Pops up to `max` queued messages into `out`, up to 64 per hold of the ring lock;
    /// never waits for a message.
    fn try_pop_more(&self, max: usize, out: &mut Vec<Received>) -> Result<()> {
        if self.ring().is_empty() {
            return Ok(());
        }
        self.attach_before_pop()?;
        let mut entries = [Entry {
            block: 0,
            origin: 0,
        }; 64];
        let mut taken = 0;
        while taken < max {
            let batch = (max - taken).min(entries.len());
            let count = {
                let _guard = self.slab.lock(&self.control().ring_lock)?;
                let ring = self.ring();
                let mut count = 0;
                while count < batch {
                    let Some(entry) = self.pop_owned(&ring) else {
                        break;
                    };
                    entries[count] = entry;
                    count += 1;
                }
                count
            };
            if count == 0 {
                break;
            }
            self.after_pops(count as u32);
            for entry in &entries[..count] {
                match self.received_entry(*entry) {
                    Ok(received) => out.push(received),
                    // As `try_pop` reports it, but the others popped with it still arrive.
                    Err(_) => self.release_message(SlabRef(entry.block)),
                }
            }
            taken += count;
            if count < batch {
                break;
            }
        }
        Ok(())
    }

    /// Maps any new segment before the ring lock is taken, never under it (mapping
    /// populates every page: milliseconds); errors surface later, under the lock. A quick
    /// call does not map: it gives way to the normal retry.
    fn attach_before_pop(&self) -> Result<()> {
        if !crate::wait::is_quick() {
            let _ = self.slab.attach_all();
        } else if !self.slab.all_attached() {
            return Err(Error::WouldBlock);
        }
        Ok(())
    }

    /// Takes the oldest entry off `ring` (ring lock held), making its block ours first:
    /// the owner is recorded before `head` moves, so if this process dies at any point here
    /// `reclaim` finds the block either still in the ring or owned by us, never neither.
    fn pop_owned(&self, ring: &Ring<'_>) -> Option<Entry> {
        let entry = ring.peek()?;
        if let Ok(header) = self.slab.header(SlabRef(entry.block)) {
            header.owner.store(
                owner_word(OWNER_RECEIVER, self.slab.slot_id()),
                Ordering::Relaxed,
            );
        }
        crate::failpoint!("pop.owned_before_head_moves");
        ring.pop();
        Some(entry)
    }

    /// The message a popped entry names. The entry and the block are shared memory:
    /// `content` checks the block is in use, and the length is read once and kept within it.
    fn received_entry(&self, entry: Entry) -> Result<Received> {
        let block = SlabRef(entry.block);
        let (header, address, capacity) = self.slab.content(block)?;
        let len = (header.content_len.load(Ordering::Relaxed) as usize).min(capacity);
        Ok(Received {
            block,
            address,
            len,
        })
    }

    /// After `count` pops: counts them on the word producers sleep on, and wakes producers
    /// asleep on a full ring once a quarter of it is free (or all of it, for rings of
    /// fewer than 4 cells: at once), as many as there are free cells. Waking them one pop at
    /// a time made the consumer, the one process everybody waits for, pay a system call per
    /// message whenever producers outnumber it: with 8 producers on 2 cores a consumer did
    /// 0.16x the messages of one producer's. A producer left asleep below the mark wakes at
    /// its next bounded sleep (`wait::MAX_SLEEP`), or as soon as the ring drains to the mark.
    fn after_pops(&self, count: u32) {
        let control = self.control();
        crate::failpoint!("pop.after_head_moved");
        // SeqCst: pairs with the SeqCst waiter registration in `wait_until`.
        control.ring.popped.fetch_add(count, Ordering::SeqCst);
        let waiting = control.ring.producers_waiting.load(Ordering::SeqCst);
        if waiting == 0 {
            return;
        }
        let capacity = self.capacity as u64;
        let free = capacity.saturating_sub(self.ring().len());
        if free >= (capacity / 4).max(1) {
            let wake = free.min(u64::from(waiting)).min(i32::MAX as u64) as i32;
            futex_wake(&control.ring.popped, wake);
        }
    }

    pub(super) fn try_pop(&self) -> Result<Option<Received>> {
        self.attach_before_pop()?;
        let entry = {
            let _guard = self.slab.lock(&self.control().ring_lock)?;
            match self.pop_owned(&self.ring()) {
                Some(entry) => entry,
                None => return Ok(None),
            }
        };
        self.after_pops(1);
        self.received_entry(entry).map(Some)
    }

    /// Frees a received message's block (and its references to `alloc` buffers) once its
    /// last view is gone, and counts the acknowledgement for its sender. Never waits: if
    /// the heap lock is taken, the release is deferred (see [`Deferred`]).
    pub fn release_message(&self, block: SlabRef) {
        if !self.owned_here() {
            return;
        }
        crate::failpoint!("release.before");
        if self.kind().fans_out() {
            return self.release_shared(block);
        }
        match self.slab.try_free_message(block) {
            Ok(Some(origin)) => self.uncount_outstanding(origin),
            Ok(None) => self.defer(Deferred::Message(block)),
            Err(_) => {}
        }
    }

    /// Drops this process's hold on an `alloc` buffer (its last view here died); messages
    /// that reference it keep it. Never waits, as `release_message`.
    pub fn release_buffer(&self, block: SlabRef) {
        if !self.owned_here() {
            return;
        }
        if let Ok(false) = self.slab.try_drop_creator(block) {
            self.defer(Deferred::Creator(block));
        }
    }

    pub(super) fn defer(&self, release: Deferred) {
        // `try_lock`: a fork child may inherit the list locked by a thread that does not
        // exist there; then (or while another thread drains) the release just waits.
        match self.deferred.try_lock() {
            Ok(mut list) => list.push(release),
            Err(_) => return self.run(release, None),
        }
        // The watchers sleep on this word: wake ours to run the release now rather than at
        // its next tick (the others wake, look, and sleep again).
        futex_wake(&self.control().heap.segment_count, i32::MAX);
    }

    /// Runs a release, waiting for the heap lock; one that times out (the call's deadline
    /// passed while a live process held the lock) goes back on `retry`.
    fn run(&self, release: Deferred, retry: Option<&mut Vec<Deferred>>) {
        let outcome = match release {
            Deferred::Message(block) => self
                .slab
                .free_message(block)
                .map(|origin| self.uncount_outstanding(origin)),
            Deferred::Abandoned(block) => self.slab.free_message(block).map(drop),
            Deferred::Creator(block) => self.slab.drop_creator(block),
            Deferred::Shared(_) | Deferred::FreeShared(_) | Deferred::CloseSubscriber(_) => {
                self.run_fan_out(release)
            }
        };
        if let (Err(Error::Full(_) | Error::Empty(_)), Some(retry)) = (outcome, retry) {
            retry.push(release);
        }
    }

    /// Runs the releases deferred in this process (waiting for the heap lock). Called by
    /// the watcher thread, before blocking calls and when the channel is dropped, never
    /// from a destructor. In a fork child the list is the parent's: left alone.
    pub fn run_deferred(&self) {
        // A quick call leaves them to the next normal call or the watcher: they wait for
        // the heap lock, and a quick call must not.
        if !self.owned_here() || crate::wait::is_quick() {
            return;
        }
        if self.kind().fans_out() {
            let mut releases = self.take_fan_out_deferred().into_iter();
            while let Some(release) = releases.next() {
                if self.run_fan_out(release).is_err() {
                    // Timed out: this one and the rest wait for the next run.
                    for release in std::iter::once(release).chain(releases) {
                        self.defer_fan_out(release);
                    }
                    break;
                }
            }
        }
        let releases = match self.deferred.try_lock() {
            Ok(mut list) if !list.is_empty() => std::mem::take(&mut *list),
            _ => return,
        };
        let mut retry = vec![];
        for release in releases {
            self.run(release, Some(&mut retry));
        }
        if !retry.is_empty() {
            match self.deferred.lock() {
                Ok(mut list) => list.extend(retry),
                Err(poisoned) => poisoned.into_inner().extend(retry),
            }
        }
    }

    /// Counts one acknowledgement for the tenure `origin` names (`origin_word`); nothing if
    /// that process has left its slot since.
    pub(super) fn uncount_outstanding(&self, origin: u32) {
        let index = origin as u16;
        let Some(slot) = self.control().processes.get(usize::from(index)) else {
            return;
        };
        let tenure = slot
            .occupant(index)
            .map(|occupant| origin_word(occupant.slot));
        if tenure != Some(origin) {
            return;
        }
        let _ = slot
            .outstanding
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(1))
            });
        // SeqCst: pairs with the SeqCst waiter registration in `wait_for_all_ack`.
        slot.acked.fetch_add(1, Ordering::SeqCst);
        if slot.ack_waiters.load(Ordering::SeqCst) > 0 {
            futex_wake(&slot.acked, i32::MAX);
        }
    }

    /// Waits until every message this process put has been released by its receiver.
    /// False on timeout, or when no receiver is left to release them.
    pub fn wait_for_all_ack(&self, deadline: Deadline, interrupt: Interrupt) -> Result<bool> {
        let slot = &self.control().processes[usize::from(self.slot())];
        let done = || slot.outstanding.load(Ordering::Acquire) == 0;
        if done() {
            return Ok(true);
        }
        let result =
            self.wait_until(&slot.acked, &slot.ack_waiters, deadline, interrupt, || {
                if done() {
                    return Ok(Some(true));
                }
                if !self.any_open(Side::Receiver) && !self.ring().is_empty() {
                    return Ok(Some(false));
                }
                Ok(None)
            })?;
        Ok(result.unwrap_or(false))
    }
}
