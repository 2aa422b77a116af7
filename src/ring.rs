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
    //! Model of two producers and one consumer sharing the ring under the lock word.
    use super::*;
    use crate::layout::LockWord;
    use crate::lock::Holder;
    use crate::sync::{AtomicU32, AtomicU64};
    use loom::sync::Arc;

    struct Shared {
        lock: LockWord,
        state: RingState,
        cells: Vec<Cell>,
    }

    #[test]
    fn each_message_once_in_producer_order() {
        loom::model(|| {
            let shared = Arc::new(Shared {
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
                cells: (0..2)
                    .map(|_| Cell {
                        block: AtomicU64::new(0),
                        origin: AtomicU32::new(0),
                        _reserved: AtomicU32::new(0),
                    })
                    .collect(),
            });
            let producers: Vec<_> = (1..=2u32)
                .map(|producer| {
                    let shared = shared.clone();
                    loom::thread::spawn(move || {
                        for seq in 0..2u64 {
                            loop {
                                let _guard =
                                    shared.lock.lock(Holder::new(producer as u16, 1), |_| {});
                                let ring = Ring {
                                    state: &shared.state,
                                    cells: &shared.cells,
                                };
                                if ring.push(Entry {
                                    block: u64::from(producer) * 10 + seq,
                                    origin: producer,
                                }) {
                                    break;
                                }
                                drop(_guard);
                                loom::thread::yield_now();
                            }
                        }
                    })
                })
                .collect();
            let mut seen = vec![];
            while seen.len() < 4 {
                let _guard = shared.lock.lock(Holder::new(0, 1), |_| {});
                let ring = Ring {
                    state: &shared.state,
                    cells: &shared.cells,
                };
                match ring.pop() {
                    Some(entry) => seen.push(entry.block),
                    None => {
                        drop(_guard);
                        loom::thread::yield_now();
                    }
                }
            }
            for producer in producers {
                producer.join().unwrap();
            }
            for producer in [1u64, 2] {
                let order: Vec<_> = seen.iter().filter(|b| *b / 10 == producer).collect();
                assert_eq!(order, vec![&(producer * 10), &(producer * 10 + 1)]);
            }
        });
    }
}
