//! Publishing to a fan-out channel, taking messages from it (a subscriber's next, or a
//! mailbox's newest), and letting go of them.
use super::*;

impl Channel {
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
                "broadcast channel full: the slowest subscriber{} has not read the {} messages retained for it (depth); a subscriber nobody reads from holds the publisher back: close it",
                self.slowest_subscriber()
                    .map(|pids| format!(" (held by pid {pids:?})"))
                    .unwrap_or_default(),
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

    pub(crate) fn try_publish_shared(&self, allocation: &Allocation) -> Result<Option<u64>> {
        let me = self.slab.slot_id();
        let prefix = self.prefix(allocation.block)?;
        let header = self.slab.header(allocation.block)?;
        let _guard = self.fan_out_lock()?;
        let ring = self.ring();
        let kind = self.kind();
        if ring.is_full() {
            self.retire_read(true);
        }
        if ring.is_full() {
            if kind == (Kind::Broadcast { drop_oldest: false }) {
                return Ok(None);
            }
            // A mailbox's ring has a spare cell, so this only runs after a writer died
            // between its push and its eviction below.
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
        if kind == Kind::Latest {
            // Pushed before the previous version is retired: a writer that dies here
            // leaves two versions retained, never none (its reaper retires the older).
            crate::failpoint!("fanout.pushed_before_retiring");
            self.retire_older_versions();
        }
        Ok(Some(seq))
    }

    /// Retires every mailbox version but the newest. Ring lock held.
    pub(crate) fn retire_older_versions(&self) {
        // Bounded by the ring's cells, whatever a corrupt `head`/`tail` pair says.
        for _ in 0..self.ring().cells.len() {
            if self.kind() != Kind::Latest || self.ring().len() <= 1 {
                break;
            }
            self.evict_oldest(true);
        }
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
        let received = self.take_or_wait(
            block,
            deadline,
            interrupt,
            |_| self.backlog(id) > 0,
            || self.try_take(id),
        )?;
        received.ok_or_else(|| match block {
            false => Error::Empty("no new message".into()),
            true => Error::Empty("no message arrived before the timeout".into()),
        })
    }

    /// Runs `take` until it yields, spinning briefly while `ready` says something may be
    /// there, then sleeping until a publish (or the deadline; `None`). With every publisher
    /// gone and nothing left, the side's `Closed`/`PeerGone`.
    fn take_or_wait<T>(
        &self,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
        ready: impl Fn(&Ring<'_>) -> bool,
        take: impl Fn() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        self.run_deferred();
        let attempt = || -> Result<Option<T>> {
            if let Some(taken) = take()? {
                return Ok(Some(taken));
            }
            if !self.any_open(Side::Sender) {
                return take()?
                    .map(Some)
                    .ok_or_else(|| self.side_gone(Side::Sender));
            }
            Ok(None)
        };
        if let Some(taken) = attempt()? {
            return Ok(Some(taken));
        }
        if !block {
            return Ok(None);
        }
        if let Some(taken) = self.spin(None, deadline, &mut *interrupt, ready, &take)? {
            return Ok(Some(taken));
        }
        let ring_state = &self.control().ring;
        self.wait_until(
            &ring_state.pushed,
            &ring_state.consumers_waiting,
            deadline,
            interrupt,
            attempt,
        )
    }

    pub(crate) fn try_take(&self, id: SubscriberId) -> Result<Option<Received>> {
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
        let taken = self.take_or_wait(
            true,
            deadline,
            interrupt,
            |ring| ring.positions().1 > newer_than,
            || self.try_take_latest(newer_than),
        )?;
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

    pub(crate) fn try_take_latest(&self, newer_than: u64) -> Result<Option<(u64, Received)>> {
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
    pub(crate) fn hold(&self, block: SlabRef) -> Result<()> {
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
    pub(crate) fn received(&self, block: SlabRef) -> Result<Received> {
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
    pub(crate) fn release_shared(&self, block: SlabRef) {
        match self.slab.try_lock_ring() {
            Some(_guard) => self.release_shared_locked(block, false),
            None => self.defer_fan_out(receive::Deferred::Shared(block)),
        }
    }

    /// `release_shared` with the ring lock held; `wait`: the free may wait for the heap
    /// lock (else, with it busy, the free is deferred).
    pub(crate) fn release_shared_locked(&self, block: SlabRef, wait: bool) {
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
    pub(in crate::channel) fn run_fan_out(&self, release: receive::Deferred) -> Result<()> {
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
}
