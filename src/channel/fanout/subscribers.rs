//! Broadcast subscribers: their entries (shared cursors), who holds them, and retiring
//! what every live one has read.
use super::*;

impl Channel {
    pub(crate) fn entry(&self, index: u16) -> &SubscriberEntry {
        &self.control().fan_out.subscribers[usize::from(index)]
    }

    pub(crate) fn entries(&self) -> impl Iterator<Item = (u16, &SubscriberEntry)> {
        let fan_out = &self.control().fan_out;
        let used = (fan_out.subscribers_used.load(Ordering::Relaxed) as usize).min(MAX_SUBSCRIBERS);
        fan_out.subscribers[..used]
            .iter()
            .enumerate()
            .map(|(index, entry)| (index as u16, entry))
    }

    pub(crate) fn is_current(&self, id: SubscriberId) -> bool {
        self.entry(id.index).state.load(Ordering::Relaxed) == active(id.generation)
    }

    /// True while a subscriber counts: a process has it open, or a pickled handle of it
    /// is on its way to one. Ring lock held.
    pub(crate) fn entry_alive(&self, index: u16, entry: &SubscriberEntry) -> bool {
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
                && pinned(word) == pin(0, id)
                && control.pending_token(cell) == pin_token(word)
        })
    }

    /// Frees the entries nobody holds any more. Ring lock held.
    pub(crate) fn drop_dead_entries(&self) {
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
        // The id may come from a pickle: never index with it unchecked.
        if usize::from(id.index) >= MAX_SUBSCRIBERS || id.generation == 0 {
            return Err(Error::Incompatible(format!(
                "a pickled subscriber names entry {} generation {}, which no broadcast channel has (corrupt pickle?)",
                id.index, id.generation
            )));
        }
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
            None => self.defer_fan_out(receive::Deferred::CloseSubscriber(id)),
        }
    }

    pub(crate) fn close_subscriber_locked(&self, id: SubscriberId, wait: bool) {
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

    /// The pids holding the live subscriber furthest behind (for error messages; a
    /// snapshot taken without the lock).
    pub(crate) fn slowest_subscriber(&self) -> Option<Vec<u32>> {
        let (_, entry) = self
            .entries()
            .filter(|(_, entry)| entry.state.load(Ordering::Relaxed) & 1 != 0)
            .min_by_key(|(_, entry)| entry.cursor.load(Ordering::Relaxed))?;
        let control = self.control();
        let pids = (0..crate::layout::MAX_PROCESSES as u16)
            .filter(|&slot| {
                let (word, bit) = bit_of(slot);
                entry.holders[word].load(Ordering::Relaxed) & bit != 0
            })
            .filter_map(|slot| control.processes[usize::from(slot)].pid())
            .collect();
        Some(pids)
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

    /// Retires the messages every live subscriber has read (in a broadcast channel). Ring lock held; `wait` as for `free_if_unused`. True if
    /// any was retired.
    pub(crate) fn retire_read(&self, wait: bool) -> bool {
        if !matches!(self.kind(), Kind::Broadcast { .. }) {
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
        // At most one ring's worth: `head` and `tail` are shared memory, and a corrupt
        // pair must not make this loop 2^64 times.
        for _ in (head..slowest).take(ring.cells.len()) {
            self.evict_oldest(wait);
        }
        slowest > head
    }

    /// Retires the oldest retained message, freeing it unless someone holds it. Ring lock
    /// held.
    pub(crate) fn evict_oldest(&self, wait: bool) {
        if let Some(entry) = self.ring().pop() {
            crate::failpoint!("fanout.evicted");
            self.free_if_unused(SlabRef(entry.block), wait);
        }
    }

    pub(crate) fn wake_publishers(&self) {
        let ring = &self.control().ring;
        // SeqCst: pairs with the SeqCst waiter registration in `wait_until`.
        ring.popped.fetch_add(1, Ordering::SeqCst);
        if ring.producers_waiting.load(Ordering::SeqCst) > 0 {
            futex_wake(&ring.popped, i32::MAX);
        }
    }
}
