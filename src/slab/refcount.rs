//! The transitions of an `alloc` block's `refs` word (see `slab::refs` for the protocol),
//! each a function of the block's header alone so that the loom model below runs the very
//! code the slab runs. Every one is called with the heap lock held: `refs` of an `alloc`
//! block only ever changes under it.
use super::block::{owner_word, BlockHeader, OWNER_ORPHAN};
use super::refs::CREATOR;
use crate::sync::Ordering;

// Relaxed throughout: the heap lock's Acquire/Release orders every access to `refs` and
// `owner` of an `alloc` block.

/// One more complete message references the block (`Slab::commit_message`).
pub(super) fn count_message(header: &BlockHeader) {
    header.refs.fetch_add(1, Ordering::Relaxed);
}

/// The creator's hold is to be dropped: false if its bit was dropped already (there is
/// nothing to do); otherwise records that only messages hold the block now (for reports;
/// the [`CREATOR`] bit is what counts) and the caller drops the bit.
pub(super) fn orphan(header: &BlockHeader) -> bool {
    if header.refs.load(Ordering::Relaxed) & CREATOR == 0 {
        return false;
    }
    header.owner.store(
        owner_word(OWNER_ORPHAN, Default::default()),
        Ordering::Relaxed,
    );
    true
}

/// Subtracts `amount` (a message's entries, or [`CREATOR`]) from `refs`, saturating:
/// recounting repairs what a corrupt count would need. True when nobody holds the block
/// any more, and the caller frees it.
pub(super) fn drop_reference(header: &BlockHeader, amount: u32) -> bool {
    let refs = header.refs.load(Ordering::Relaxed);
    let left = if amount == CREATOR {
        refs & !CREATOR
    } else {
        (refs & !CREATOR).saturating_sub(amount) | (refs & CREATOR)
    };
    header.refs.store(left, Ordering::Relaxed);
    left == 0
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Models of an `alloc` buffer's holders (see `make loom`):
    //! its creator, the messages that reference it and the reapers of a dead creator, each
    //! running under the heap lock what the matching `Slab` method runs there, with the
    //! functions above. `Block::used` and `Block::free` stand in for `Slab::used_header`
    //! and `Slab::free_locked`, which need mapped segments: they test and write the same
    //! header words. `Heap::holders` is the model's own count of who still holds the
    //! buffer, which `refs` must never contradict.
    use super::super::block::{
        pack, unpack, OWNER_ALLOC, OWNER_QUEUED, OWNER_SENDER, STATE_FREE, STATE_USED,
    };
    use super::super::refs::{check_owner, is_alloc, is_complete_message, is_message};
    use super::super::SlabRef;
    use super::*;
    use crate::layout::LockWord;
    use crate::lock::{Holder, LockGuard};
    use crate::procs::SlotId;
    use crate::sync::{AtomicU32, AtomicU64};
    use loom::sync::Arc;

    const fn slot(index: u16, generation: u32) -> SlotId {
        SlotId { index, generation }
    }

    /// The process that allocated the buffer and put the messages.
    const CREATOR_A: SlotId = slot(1, 1);
    /// The next tenure of the creator's slot, which allocates the buffer again once freed.
    const CREATOR_C: SlotId = slot(1, 2);
    const CONSUMERS: [SlotId; 2] = [slot(2, 1), slot(3, 1)];
    const REAPERS: [SlotId; 2] = [slot(4, 1), slot(5, 1)];
    const BLOCK_SIZE: usize = 128;

    struct Block {
        at: SlabRef,
        header: BlockHeader,
        frees: AtomicU32,
    }

    impl Block {
        fn new(index: usize, owner: u64, refs: u32) -> Block {
            let block = Block {
                at: SlabRef::new(0, index * BLOCK_SIZE),
                header: BlockHeader {
                    size_state: AtomicU64::new(pack(BLOCK_SIZE, STATE_FREE)),
                    prev_size: AtomicU64::new(0),
                    next_free: AtomicU64::new(0),
                    prev_free: AtomicU64::new(0),
                    refs: AtomicU32::new(0),
                    origin: AtomicU32::new(0),
                    owner: AtomicU64::new(0),
                    check: AtomicU64::new(0),
                    content_len: AtomicU64::new(0),
                },
                frees: AtomicU32::new(0),
            };
            block.allocate(owner, refs);
            block
        }

        /// What `Slab::allocate` writes into the header of the block it hands out.
        fn allocate(&self, owner: u64, refs: u32) {
            let header = &self.header;
            header.refs.store(refs, Ordering::Relaxed);
            header.owner.store(owner, Ordering::Relaxed);
            header.check.store(self.at.check_word(), Ordering::Relaxed);
            let (size, _) = unpack(header.size_state.load(Ordering::Relaxed));
            header
                .size_state
                .store(pack(size, STATE_USED), Ordering::Release);
        }

        /// `Slab::used_header`: a block in use whose owner word is of `kind`.
        fn used(&self, kind: fn(u64) -> bool) -> bool {
            let (_, state) = unpack(self.header.size_state.load(Ordering::Acquire));
            state == STATE_USED
                && self.header.check.load(Ordering::Acquire) == self.at.check_word()
                && kind(self.header.owner.load(Ordering::Relaxed))
        }

        /// `Slab::free_locked`'s writes to the header.
        fn free(&self) {
            self.frees.fetch_add(1, Ordering::Relaxed);
            self.header.check.store(0, Ordering::Relaxed);
            let (size, _) = unpack(self.header.size_state.load(Ordering::Relaxed));
            self.header
                .size_state
                .store(pack(size, STATE_FREE), Ordering::Relaxed);
        }
    }

    struct Heap {
        lock: LockWord,
        buffer: Block,
        messages: Vec<Block>,
        /// Who holds the buffer in truth: its creator while alive, and every committed
        /// message until it is freed.
        holders: AtomicU32,
        /// Times a creator's bit was dropped (`orphan` said so).
        creator_drops: AtomicU32,
    }

    impl Heap {
        /// The buffer, allocated by `CREATOR_A`, and `messages` message blocks it is filling
        /// that will reference the buffer once each.
        fn new(messages: usize) -> Arc<Heap> {
            Arc::new(Heap {
                lock: LockWord {
                    state: AtomicU32::new(0),
                },
                buffer: Block::new(0, owner_word(OWNER_ALLOC, CREATOR_A), CREATOR),
                messages: (1..=messages)
                    .map(|index| Block::new(index, owner_word(OWNER_SENDER, CREATOR_A), 1))
                    .collect(),
                holders: AtomicU32::new(1),
                creator_drops: AtomicU32::new(0),
            })
        }

        fn lock(&self, me: SlotId) -> LockGuard<'_> {
            self.lock.lock(Holder::new(me.index, me.generation), |_| {})
        }

        /// `Slab::drop_reference_locked` on the buffer; true if it freed it.
        fn drop_reference_locked(&self, amount: u32) -> bool {
            if !self.buffer.used(is_alloc) {
                return false;
            }
            if !drop_reference(&self.buffer.header, amount) {
                return false;
            }
            assert_eq!(self.holders.load(Ordering::SeqCst), 0, "freed while held");
            self.buffer.free();
            true
        }

        /// `Slab::commit_message`: message `index` now references the buffer.
        fn commit_message(&self, me: SlotId, index: usize) {
            let _guard = self.lock(me);
            let message = &self.messages[index];
            assert!(message.used(is_message) && self.buffer.used(is_alloc));
            count_message(&self.buffer.header);
            self.holders.fetch_add(1, Ordering::SeqCst);
            message
                .header
                .owner
                .store(owner_word(OWNER_QUEUED, me), Ordering::Relaxed);
        }

        /// `Slab::free_message`, by the consumer of message `index` once its last view died;
        /// true if that freed the buffer.
        fn free_message(&self, me: SlotId, index: usize) -> bool {
            let _guard = self.lock(me);
            let message = &self.messages[index];
            assert!(message.used(is_message), "message freed twice");
            let mut freed = false;
            if is_complete_message(message.header.owner.load(Ordering::Relaxed)) {
                self.holders.fetch_sub(1, Ordering::SeqCst);
                freed = self.drop_reference_locked(1);
            }
            message.free();
            freed
        }

        /// `Slab::drop_creator_of`: by the creator when its last view died (`expected` is
        /// `None`), or by a reaper that found the creator dead while the buffer's owner word
        /// was `expected`. True if that freed the buffer.
        fn drop_creator(&self, me: SlotId, expected: Option<u64>) -> bool {
            let _guard = self.lock(me);
            if expected.is_none() {
                self.holders.fetch_sub(1, Ordering::SeqCst);
            }
            if !self.buffer.used(is_alloc)
                || check_owner(self.buffer.at, &self.buffer.header, expected).is_err()
                || !orphan(&self.buffer.header)
            {
                return false;
            }
            self.creator_drops.fetch_add(1, Ordering::SeqCst);
            self.drop_reference_locked(CREATOR)
        }

        /// `Slab::allocate` hands the freed buffer to the creator slot's next tenure.
        fn reallocate(&self, me: SlotId) {
            let _guard = self.lock(me);
            assert!(!self.buffer.used(|_| true), "freed buffer handed out twice");
            self.buffer
                .allocate(owner_word(OWNER_ALLOC, CREATOR_C), CREATOR);
            self.holders.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// The creator puts a second message referencing its buffer while the first is being
    /// released, then lets go of its views while the second is released too.
    #[test]
    fn buffer_is_freed_once_by_its_last_holder() {
        // Small enough to go a preemption deeper than the rest (620 interleavings).
        crate::sync::model(3, || {
            let heap = Heap::new(2);
            heap.commit_message(CREATOR_A, 0);
            let creator = {
                let heap = heap.clone();
                loom::thread::spawn(move || {
                    heap.commit_message(CREATOR_A, 1);
                    let consumer = {
                        let heap = heap.clone();
                        loom::thread::spawn(move || heap.free_message(CONSUMERS[1], 1))
                    };
                    let freed = heap.drop_creator(CREATOR_A, None);
                    u32::from(freed) + u32::from(consumer.join().unwrap())
                })
            };
            let freed = u32::from(heap.free_message(CONSUMERS[0], 0)) + creator.join().unwrap();
            assert_eq!(freed, 1);
            assert_eq!(heap.buffer.frees.load(Ordering::Relaxed), 1);
            assert_eq!(heap.creator_drops.load(Ordering::Relaxed), 1);
            assert_eq!(heap.holders.load(Ordering::Relaxed), 0);
        });
    }

    /// The creator died holding its views and one queued message: two reapers drop its
    /// bit while the message is released, and whoever frees the buffer hands it out again
    /// to the slot's next tenure, whose bit a reaper that comes late must not touch.
    #[test]
    fn dead_creator_is_reaped_once_while_its_message_is_released() {
        loom::model(|| {
            let heap = Heap::new(1);
            heap.commit_message(CREATOR_A, 0);
            // The creator's death: its hold ends, its bit stays for a reaper. The reapers
            // saw this owner word when they found it dead.
            heap.holders.fetch_sub(1, Ordering::SeqCst);
            let seen = heap.buffer.header.owner.load(Ordering::Relaxed);
            let reapers: Vec<_> = REAPERS
                .into_iter()
                .map(|me| {
                    let heap = heap.clone();
                    loom::thread::spawn(move || {
                        if heap.drop_creator(me, Some(seen)) {
                            heap.reallocate(me);
                        }
                    })
                })
                .collect();
            if heap.free_message(CONSUMERS[0], 0) {
                heap.reallocate(CONSUMERS[0]);
            }
            for reaper in reapers {
                reaper.join().unwrap();
            }
            assert_eq!(heap.creator_drops.load(Ordering::Relaxed), 1);
            assert_eq!(heap.buffer.frees.load(Ordering::Relaxed), 1);
            let header = &heap.buffer.header;
            assert!(heap.buffer.used(is_alloc));
            assert_eq!(
                header.owner.load(Ordering::Relaxed),
                owner_word(OWNER_ALLOC, CREATOR_C)
            );
            assert_eq!(header.refs.load(Ordering::Relaxed), CREATOR);
        });
    }
}
