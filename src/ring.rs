//! The descriptor ring: a bounded FIFO of published messages, shared by every producer
//! and consumer of a channel.
//!
//! It is guarded by the ring lock rather than lock-free on purpose: a lock-free MPMC ring
//! (Vyukov style) leaves a cell claimed-but-unpublished forever if its producer is killed
//! between the claim and the publish, which stalls every consumer behind it. Under the lock
//! a push writes the cell and then advances `tail` (and a pop reads the cell, then advances
//! `head`), so a process killed at any instruction leaves either the old or the new state;
//! the lock itself is broken when its holder is found dead. Critical sections are a few
//! loads and stores; no copy ever happens under the lock.
//!
//! Per-producer order holds because one producer's pushes are ordered by the lock; each
//! message is popped by exactly one consumer because pops are too.
use crate::layout::{Cell, RingState};
use crate::sync::Ordering;

/// The ring of a channel: its indices plus its cells (which follow the control block).
pub struct Ring<'a> {
    pub state: &'a RingState,
    pub cells: &'a [Cell],
}

/// A message as it sits in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub block: u64,
    pub origin: u32,
}

impl Ring<'_> {
    pub fn capacity(&self) -> u64 {
        self.cells.len() as u64
    }

    /// `(head, tail)`: in a fan-out channel, the sequence numbers of the oldest retained
    /// message and of the next one to publish. A snapshot unless the ring lock is held.
    pub fn positions(&self) -> (u64, u64) {
        // Acquire: pairs with the Release stores of `push` and `pop`.
        let tail = self.state.tail.load(Ordering::Acquire);
        let head = self.state.head.load(Ordering::Acquire);
        (head.min(tail), tail)
    }

    /// The block of the message at ring position `index` (reduced modulo the capacity).
    pub fn block_at(&self, index: u64) -> u64 {
        self.entry_at(index).block
    }

    /// Messages queued and not yet taken. Exact under the ring lock, a snapshot otherwise.
    pub fn len(&self) -> u64 {
        let tail = self.state.tail.load(Ordering::Acquire);
        let head = self.state.head.load(Ordering::Acquire);
        tail.saturating_sub(head)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_full(&self) -> bool {
        self.len() >= self.capacity()
    }

    /// Appends `entry`; false when full. Ring lock held by the caller.
    pub fn push(&self, entry: Entry) -> bool {
        let head = self.state.head.load(Ordering::Relaxed);
        let tail = self.state.tail.load(Ordering::Relaxed);
        if tail - head >= self.capacity() {
            return false;
        }
        let cell = &self.cells[(tail % self.capacity()) as usize];
        cell.block.store(entry.block, Ordering::Relaxed);
        cell.origin.store(entry.origin, Ordering::Relaxed);
        // Release: the cell is written before `tail` covers it (pairs with the Acquire in
        // `len`; consumers also read it under the lock, whose Acquire orders it anyway).
        self.state.tail.store(tail + 1, Ordering::Release);
        true
    }

    /// The entry in cell `index` (a ring position, not yet reduced modulo capacity).
    fn entry_at(&self, index: u64) -> Entry {
        let cell = &self.cells[(index % self.capacity()) as usize];
        Entry {
            block: cell.block.load(Ordering::Relaxed),
            origin: cell.origin.load(Ordering::Relaxed),
        }
    }

    /// The oldest entry, left in place. Ring lock held by the caller.
    pub fn peek(&self) -> Option<Entry> {
        let head = self.state.head.load(Ordering::Relaxed);
        let tail = self.state.tail.load(Ordering::Acquire);
        (head != tail).then(|| self.entry_at(head))
    }

    /// Takes the oldest entry. Ring lock held by the caller.
    pub fn pop(&self) -> Option<Entry> {
        let entry = self.peek()?;
        let head = self.state.head.load(Ordering::Relaxed);
        // Release: the cell is read before producers may reuse it.
        self.state.head.store(head + 1, Ordering::Release);
        Some(entry)
    }

    /// The entries queued now, oldest first. Ring lock held by the caller. At most one
    /// ring's worth: `head` and `tail` are shared memory, and a corrupt pair must not
    /// make this walk 2^64 cells.
    pub fn queued(&self) -> impl Iterator<Item = Entry> + '_ {
        let head = self.state.head.load(Ordering::Relaxed);
        let tail = self.state.tail.load(Ordering::Relaxed);
        (head..tail)
            .take(self.cells.len())
            .map(move |index| self.entry_at(index))
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::{AtomicU32, AtomicU64};

    fn state() -> RingState {
        RingState {
            head: AtomicU64::new(0),
            tail: AtomicU64::new(0),
            pushed: AtomicU32::new(0),
            popped: AtomicU32::new(0),
            consumers_waiting: AtomicU32::new(0),
            producers_waiting: AtomicU32::new(0),
        }
    }

    fn cells(n: usize) -> Vec<Cell> {
        (0..n)
            .map(|_| Cell {
                block: AtomicU64::new(0),
                origin: AtomicU32::new(0),
                _reserved: AtomicU32::new(0),
            })
            .collect()
    }

    #[test]
    fn fifo_with_wraparound_and_capacity() {
        let (state, cells) = (state(), cells(3));
        let ring = Ring {
            state: &state,
            cells: &cells,
        };
        for round in 0..10u64 {
            for i in 0..3 {
                assert!(ring.push(Entry {
                    block: round * 10 + i,
                    origin: 1
                }));
            }
            assert!(!ring.push(Entry {
                block: 99,
                origin: 1
            }));
            assert!(ring.is_full());
            assert_eq!(ring.queued().count(), 3);
            for i in 0..3 {
                assert_eq!(ring.pop().unwrap().block, round * 10 + i);
            }
            assert!(ring.pop().is_none());
        }
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Producers and consumers sharing the ring under the lock word
    //! (`LOOM_MAX_PREEMPTIONS=2`; see `make loom`), waiting for room and for messages on
    //! the ring's wake-up words as `Channel` does (`try_push`, `try_pop`, `wait_until`, and
    //! the close that `ControlBlock::handles_changed` announces). A sleep ends only on a
    //! wake under loom (see `wait.rs`), so a lost wake-up is a deadlock here.
    //!
    //! Loom treats SeqCst loads and read-modify-writes as AcqRel (a documented limitation),
    //! which would let both sides of the channel's SeqCst pairing (a waiter registers and
    //! re-reads the word; a waker bumps the word and reads the waiter count) miss each
    //! other, a lost wake-up real SeqCst rules out. The model states that guarantee with
    //! a SeqCst fence between the two accesses on each side, the form loom does check.
    use super::*;
    use crate::layout::LockWord;
    use crate::lock::Holder;
    use crate::sync::{AtomicU32, AtomicU64};
    use crate::wait::{futex_wait, futex_wake, MAX_SLEEP};
    use loom::sync::atomic::fence;
    use loom::sync::Arc;

    struct Shared {
        lock: LockWord,
        state: RingState,
        cells: Vec<Cell>,
        /// Producers that have not closed yet (`Channel::any_open(Side::Sender)`).
        open_producers: AtomicU32,
    }

    impl Shared {
        fn new(producers: u32, capacity: usize) -> Shared {
            Shared {
                lock: LockWord {
                    state: AtomicU32::new(0),
                },
                state: RingState {
                    head: AtomicU64::new(0),
                    tail: AtomicU64::new(0),
                    pushed: AtomicU32::new(0),
                    popped: AtomicU32::new(0),
                    consumers_waiting: AtomicU32::new(0),
                    producers_waiting: AtomicU32::new(0),
                },
                cells: (0..capacity)
                    .map(|_| Cell {
                        block: AtomicU64::new(0),
                        origin: AtomicU32::new(0),
                        _reserved: AtomicU32::new(0),
                    })
                    .collect(),
                open_producers: AtomicU32::new(producers),
            }
        }

        fn ring(&self) -> Ring<'_> {
            Ring {
                state: &self.state,
                cells: &self.cells,
            }
        }

        fn try_push(&self, me: Holder, entry: Entry) -> bool {
            let pushed = {
                let _guard = self.lock.lock(me, |_| {});
                self.ring().push(entry)
            };
            if pushed {
                self.state.pushed.fetch_add(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if self.state.consumers_waiting.load(Ordering::SeqCst) > 0 {
                    futex_wake(&self.state.pushed, 1);
                }
            }
            pushed
        }

        fn try_pop(&self, me: Holder) -> Option<Entry> {
            let entry = {
                let _guard = self.lock.lock(me, |_| {});
                self.ring().pop()?
            };
            self.state.popped.fetch_add(1, Ordering::SeqCst);
            fence(Ordering::SeqCst);
            if self.state.producers_waiting.load(Ordering::SeqCst) > 0 {
                futex_wake(&self.state.popped, 1);
            }
            Some(entry)
        }

        /// `Channel::wait_until` without deadline: `attempt` until it gives a value,
        /// sleeping on `word` in between.
        fn wait_until<T>(
            &self,
            word: &AtomicU32,
            waiters: &AtomicU32,
            mut attempt: impl FnMut() -> Option<T>,
        ) -> T {
            loop {
                let seen = word.load(Ordering::SeqCst);
                if let Some(value) = attempt() {
                    return value;
                }
                waiters.fetch_add(1, Ordering::SeqCst);
                fence(Ordering::SeqCst);
                if word.load(Ordering::SeqCst) == seen {
                    futex_wait(word, seen, MAX_SLEEP);
                }
                waiters.fetch_sub(1, Ordering::SeqCst);
            }
        }

        fn produce(&self, producer: u16, count: u64) {
            let me = Holder::new(producer, 1);
            for seq in 0..count {
                let entry = Entry {
                    block: u64::from(producer) << 8 | seq,
                    origin: u32::from(producer),
                };
                let state = &self.state;
                self.wait_until(&state.popped, &state.producers_waiting, || {
                    self.try_push(me, entry).then_some(())
                });
            }
            // Closing (`handles_changed`): every sleeper re-checks who is still open.
            self.open_producers.fetch_sub(1, Ordering::SeqCst);
            self.state.pushed.fetch_add(1, Ordering::SeqCst);
            futex_wake(&self.state.pushed, i32::MAX);
        }

        /// Takes messages until the ring is empty and every producer closed.
        fn consume(&self, consumer: u16) -> Vec<Entry> {
            let me = Holder::new(consumer, 1);
            let mut taken = vec![];
            let state = &self.state;
            loop {
                let next = self.wait_until(&state.pushed, &state.consumers_waiting, || {
                    if let Some(entry) = self.try_pop(me) {
                        return Some(Some(entry));
                    }
                    if self.open_producers.load(Ordering::SeqCst) == 0 {
                        return Some(self.try_pop(me));
                    }
                    None
                });
                match next {
                    Some(entry) => taken.push(entry),
                    None => return taken,
                }
            }
        }
    }

    /// Producer `p` (from 1) sends `messages[p - 1]` messages; `consumers` threads (the
    /// model's own thread among them) take them all.
    fn model(messages: &'static [u64], consumers: u16, capacity: usize) {
        loom::model(move || {
            let shared = Arc::new(Shared::new(messages.len() as u32, capacity));
            let mut threads = vec![];
            for (index, &count) in messages.iter().enumerate() {
                let shared = shared.clone();
                threads.push(loom::thread::spawn(move || {
                    shared.produce(index as u16 + 1, count);
                    vec![]
                }));
            }
            for consumer in 1..consumers {
                let shared = shared.clone();
                threads.push(loom::thread::spawn(move || shared.consume(100 + consumer)));
            }
            let mut taken = vec![shared.consume(100)];
            taken.extend(threads.into_iter().map(|thread| thread.join().unwrap()));
            let mut all: Vec<u64> = taken.iter().flatten().map(|entry| entry.block).collect();
            all.sort_unstable();
            let mut sent = vec![];
            for (index, &count) in messages.iter().enumerate() {
                sent.extend((0..count).map(|seq| (index as u64 + 1) << 8 | seq));
                // Each consumer sees a producer's messages in the order they were sent.
                for mine in &taken {
                    let from: Vec<_> = mine
                        .iter()
                        .filter(|e| e.origin == index as u32 + 1)
                        .collect();
                    assert!(from.windows(2).all(|pair| pair[0].block < pair[1].block));
                }
            }
            assert_eq!(all, sent, "every message taken exactly once");
        });
    }

    /// Two producers, two messages each, through two cells: the ring fills, wraps, and a
    /// producer waits for room.
    #[test]
    fn two_producers_one_consumer() {
        model(&[2, 2], 1, 2);
    }

    /// Two consumers share one producer's messages: each is taken once, and each consumer
    /// sees the ones it takes in the order they were sent.
    #[test]
    fn one_producer_two_consumers() {
        model(&[2], 2, 2);
    }
}
