//! A lock word in shared memory that knows which process holds it.
//!
//! State (32 bits): `0` = free; otherwise the holder: `holder_slot + 1` in the low 16 bits
//! and the low 15 bits of the slot's generation above them, with [`CONTENDED`] set when
//! someone may be sleeping on it. Critical sections are short (index updates, free-list
//! surgery, never a payload copy), so a waiter spins briefly and then sleeps on the futex.
//! Because the holder is recorded, a waiter can tell that it died (see `Slab::lock`)
//! instead of waiting forever; the generation makes sure the process judged dead is the
//! one that took the lock, not a new process that has since claimed the same slot (ABA),
//! and [`LockWord::force_release`] only frees the exact holder value that was judged.
use std::time::Duration;

use crate::layout::LockWord;
use crate::sync::{spin_hint, yield_now, Ordering};
use crate::wait::{futex_wait, futex_wake};

const CONTENDED: u32 = 1 << 31;
const HOLDER_MASK: u32 = !CONTENDED;
const SLOT_MASK: u32 = 0xffff;
/// The bits of a slot generation a lock word keeps.
pub const GENERATION_MASK: u32 = 0x7fff;
// Under loom every spin is a point where the model may switch threads: one spin keeps the
// spin-then-sleep path covered without multiplying the interleavings explored.
const SPINS: u32 = if cfg!(loom) { 1 } else { 200 };
/// Yields of the processor `try_lock` makes after spinning, before giving up.
const YIELDS: u32 = 16;

/// Who holds a lock: a slot and the low bits of its generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Holder(u32);

impl Holder {
    pub fn new(slot: u16, generation: u32) -> Holder {
        Holder((generation & GENERATION_MASK) << 16 | (u32::from(slot) + 1))
    }

    /// The word stored for this holder (in a lock, or a reservation like
    /// `HeapState::growing`).
    pub fn word(self) -> u32 {
        self.0
    }

    /// The holder a stored word names, if any.
    pub fn from_word(word: u32) -> Option<Holder> {
        Holder::from_state(word)
    }

    fn from_state(state: u32) -> Option<Holder> {
        let holder = state & HOLDER_MASK;
        (holder & SLOT_MASK != 0).then_some(Holder(holder))
    }

    /// The holder's slot; `u16::MAX` (no such slot) for a word naming none.
    pub fn slot(self) -> u16 {
        ((self.0 & SLOT_MASK) as u16).wrapping_sub(1)
    }

    /// The low bits ([`GENERATION_MASK`]) of the holder's slot generation.
    pub fn generation(self) -> u32 {
        self.0 >> 16 & GENERATION_MASK
    }
}

impl LockWord {
    /// Takes the lock for `me` if it is free, or becomes free within a short spin and a few
    /// yields of the processor (a holder that was preempted gets to finish: critical
    /// sections are a few pointer updates); never sleeps on the futex. For callers that
    /// must not wait long, e.g. destructors holding the GIL.
    pub fn try_lock(&self, me: Holder) -> Option<LockGuard<'_>> {
        for round in 0..SPINS + YIELDS {
            // Acquire: pairs with the Release in `LockGuard::drop`.
            if self
                .state
                .compare_exchange(0, me.0, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Some(LockGuard { word: self });
            }
            if round < SPINS {
                spin_hint();
            } else {
                yield_now();
            }
        }
        None
    }

    /// Takes the lock for `me`. `stuck` runs every sleep interval with the current holder;
    /// it may break a dead holder's lock by calling [`force_release`].
    pub fn lock(&self, me: Holder, stuck: impl FnMut(Holder)) -> LockGuard<'_> {
        match self.lock_until(me, || false, stuck) {
            Some(guard) => guard,
            None => unreachable!("a lock that never expires is always taken"),
        }
    }

    /// [`lock`](Self::lock), giving up (`None`) when `expired` says so; it is asked after
    /// every sleep (about every 20 ms), so a call's deadline bounds the wait for a holder
    /// that is alive but does not let go (stopped, or a corrupt word).
    pub fn lock_until(
        &self,
        me: Holder,
        mut expired: impl FnMut() -> bool,
        mut stuck: impl FnMut(Holder),
    ) -> Option<LockGuard<'_>> {
        let me = me.0;
        // Acquire on success: pairs with the Release in `LockGuard::drop`, so the previous
        // holder's writes to the protected state are visible.
        if self
            .state
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return Some(LockGuard { word: self });
        }
        let mut spins = 0;
        loop {
            let current = self.state.load(Ordering::Relaxed);
            if current == 0 {
                // Once contended, keep the flag: we cannot know whether others still sleep.
                let want = if spins >= SPINS { me | CONTENDED } else { me };
                if self
                    .state
                    .compare_exchange(0, want, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
                {
                    return Some(LockGuard { word: self });
                }
                continue;
            }
            if spins < SPINS {
                spins += 1;
                spin_hint();
                continue;
            }
            if current & CONTENDED == 0
                && self
                    .state
                    .compare_exchange(
                        current,
                        current | CONTENDED,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    )
                    .is_err()
            {
                continue;
            }
            futex_wait(&self.state, current | CONTENDED, Duration::from_millis(20));
            let after = self.state.load(Ordering::Relaxed);
            if after == (current | CONTENDED) {
                // Still held by the same holder after a whole sleep: let the caller check it.
                // A word naming no slot (corrupt) is a holder whose tenure is over.
                stuck(Holder(after & HOLDER_MASK));
            }
            if expired() {
                return None;
            }
        }
    }

    /// Frees a lock held by `dead`, the exact holder judged dead; false if someone else
    /// holds it by now. The caller must repair what the holder may have left half-done
    /// before relying on the protected state.
    pub fn force_release(&self, dead: Holder) -> bool {
        let current = self.state.load(Ordering::Relaxed);
        if current & HOLDER_MASK != dead.0 {
            return false;
        }
        // Release: publishes nothing of ours, but keeps the same protocol as an unlock.
        let released = self
            .state
            .compare_exchange(current, 0, Ordering::Release, Ordering::Relaxed)
            .is_ok();
        if released {
            futex_wake(&self.state, i32::MAX);
        }
        released
    }

    /// Who holds the lock now, if anyone.
    pub fn holder(&self) -> Option<Holder> {
        Holder::from_state(self.state.load(Ordering::Relaxed))
    }
}

/// Held lock; unlocks on drop.
pub struct LockGuard<'a> {
    word: &'a LockWord,
}

impl Drop for LockGuard<'_> {
    fn drop(&mut self) {
        // Release: pairs with the Acquire in `LockWord::lock` of the next holder.
        let previous = self.word.state.swap(0, Ordering::Release);
        if previous & CONTENDED != 0 {
            futex_wake(&self.word.state, 1);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::sync::AtomicU32;
    use std::sync::Arc;

    #[test]
    fn excludes_across_threads() {
        let word = Arc::new(LockWord {
            state: AtomicU32::new(0),
        });
        let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let threads: Vec<_> = (0..4u16)
            .map(|slot| {
                let (word, counter) = (word.clone(), counter.clone());
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let _guard = word.lock(Holder::new(slot, 1), |_| {});
                        // Non-atomic read-modify-write made safe only by the lock.
                        let value = counter.load(Ordering::Relaxed);
                        counter.store(value + 1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        assert_eq!(counter.load(Ordering::Relaxed), 80_000);
        assert_eq!(word.holder(), None);
    }

    #[test]
    fn dead_holder_can_be_broken() {
        let word = LockWord {
            state: AtomicU32::new(0),
        };
        let dead = Holder::new(7, 3);
        std::mem::forget(word.lock(dead, |_| {}));
        assert_eq!(word.holder(), Some(dead));
        let mut seen = None;
        let me = Holder::new(1, 1);
        let _guard = word.lock(me, |holder| {
            seen = Some(holder);
            assert!(word.force_release(holder));
        });
        assert_eq!(seen, Some(dead));
        assert_eq!(word.holder(), Some(me));
    }

    #[test]
    fn a_wait_gives_up_when_told_and_a_word_naming_no_slot_is_breakable() {
        let word = LockWord {
            state: AtomicU32::new(0),
        };
        // A live holder that never lets go: the wait ends when `expired` says so.
        let holder = Holder::new(3, 9);
        std::mem::forget(word.lock(holder, |_| {}));
        let mut asked = 0;
        let gave_up = word.lock_until(
            Holder::new(1, 1),
            || {
                asked += 1;
                asked == 3
            },
            |_| {},
        );
        assert!(gave_up.is_none());
        assert_eq!(word.holder(), Some(holder));
        // A corrupt word with no slot bits: `stuck` sees a holder of no slot, and may
        // break it.
        word.state.store(1 << 16 | CONTENDED, Ordering::Relaxed);
        let mut seen = None;
        let me = Holder::new(1, 1);
        let guard = word.lock(me, |stuck| {
            seen = Some(stuck.slot());
            assert!(word.force_release(stuck));
        });
        assert_eq!(seen, Some(u16::MAX));
        assert_eq!(word.holder(), Some(me));
        drop(guard);
    }

    #[test]
    fn only_the_exact_holder_judged_dead_is_broken() {
        let word = LockWord {
            state: AtomicU32::new(0),
        };
        // Slot 7 of generation 3 was judged dead, but the lock is now held by slot 7's new
        // occupant (generation 4): breaking it would let two processes in (ABA).
        let judged = Holder::new(7, 3);
        let successor = Holder::new(7, 4);
        let guard = word.lock(successor, |_| {});
        assert!(!word.force_release(judged));
        assert_eq!(word.holder(), Some(successor));
        drop(guard);
        assert_eq!(word.holder(), None);
        assert_eq!((successor.slot(), successor.generation()), (7, 4));
    }
}

#[cfg(all(test, loom))]
mod loom_tests {
    //! Models of the lock word (see `make loom`). Under loom a sleep in `futex_wait` lasts
    //! until a wake, so a lost wake-up shows as a deadlock; sleeps only time out once a
    //! model lets time pass (`let_sleeps_time_out`), as it does when a holder dies. A
    //! holder dies by `mem::forget` of its guard and the end of its tenure of its slot
    //! (`Shared::occupant`); waiters break the lock as `Slab::lock` does.
    use super::*;
    use crate::sync::AtomicU32;
    use crate::wait::let_sleeps_time_out;
    use loom::cell::UnsafeCell;
    use loom::sync::Arc;

    const DEAD_SLOT: u16 = 7;

    /// Breaking a lock in the window between another waiter's judgement and its
    /// `force_release` takes three preemptions: with two, a `force_release` that frees
    /// any holder passed every model here.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        crate::sync::model(3, f);
    }

    struct Shared {
        word: LockWord,
        /// Data only the holder may touch: loom reports any access not ordered after the
        /// previous holder's (two holders at once, or a missing Acquire/Release).
        protected: UnsafeCell<u32>,
        /// Generation of the live occupant of `DEAD_SLOT`, 0 once it died: what the
        /// model's `tenure_over` looks at.
        occupant: AtomicU32,
        /// Locks broken, by the holder that was broken.
        broken: loom::sync::Mutex<Vec<Holder>>,
    }

    impl Shared {
        fn new(occupant: u32) -> Arc<Shared> {
            Arc::new(Shared {
                word: LockWord {
                    state: AtomicU32::new(0),
                },
                protected: UnsafeCell::new(0),
                occupant: AtomicU32::new(occupant),
                broken: loom::sync::Mutex::new(vec![]),
            })
        }

        /// `ControlBlock::tenure_over` in the model: the tenure `holder` names is over when
        /// its slot's occupant died or is another generation (other slots are all alive).
        fn tenure_over(&self, holder: Holder) -> bool {
            holder.slot() == DEAD_SLOT
                && self.occupant.load(Ordering::SeqCst) & GENERATION_MASK != holder.generation()
        }

        /// Takes the lock as `Slab::lock` does (breaking it from a holder whose tenure is
        /// over) and updates the protected data.
        fn critical_section(&self, me: Holder) {
            let _guard = self.word.lock(me, |holder| {
                if self.tenure_over(holder) && self.word.force_release(holder) {
                    self.broken.lock().unwrap().push(holder);
                }
            });
            // SAFETY: loom checks this access itself (it panics on a concurrent one).
            self.protected.with_mut(|value| unsafe { *value += 1 });
        }

        /// `holder` takes the lock and never unlocks it.
        fn lock_forever(&self, holder: Holder) {
            std::mem::forget(self.word.lock(holder, |_| {}));
        }

        /// The occupant of `DEAD_SLOT` dies: its slot is free, and time passes for the
        /// waiters it will never wake.
        fn die(&self) {
            self.occupant.store(0, Ordering::SeqCst);
            let_sleeps_time_out();
        }

        fn protected(&self) -> u32 {
            // SAFETY: as in `critical_section`; every modelled thread has been joined.
            self.protected.with(|value| unsafe { *value })
        }
    }

    #[test]
    fn live_holders_exclude_each_other() {
        model(|| {
            let shared = Shared::new(0);
            let threads: Vec<_> = (1..3u16)
                .map(|slot| {
                    let shared = shared.clone();
                    loom::thread::spawn(move || shared.critical_section(Holder::new(slot, 1)))
                })
                .collect();
            shared.critical_section(Holder::new(0, 1));
            for thread in threads {
                thread.join().unwrap();
            }
            assert_eq!(shared.protected(), 3);
            assert_eq!(shared.word.holder(), None);
            assert!(shared.broken.lock().unwrap().is_empty());
        });
    }

    /// The holder of slot 7 dies holding the lock; two waiters find it stuck, and exactly
    /// one of them breaks it.
    #[test]
    fn dead_holder_is_broken_exactly_once() {
        model(|| {
            let dead = Holder::new(DEAD_SLOT, 3);
            let shared = Shared::new(3);
            shared.lock_forever(dead);
            shared.die();
            let waiter = {
                let shared = shared.clone();
                loom::thread::spawn(move || shared.critical_section(Holder::new(1, 1)))
            };
            shared.critical_section(Holder::new(2, 1));
            waiter.join().unwrap();
            assert_eq!(shared.protected(), 2);
            assert_eq!(*shared.broken.lock().unwrap(), vec![dead]);
            assert_eq!(shared.word.holder(), None);
        });
    }

    /// ABA: a waiter judges the dead holder of slot 7 (generation 3) over; meanwhile slot 7
    /// has a new occupant (generation 4), who breaks the lock and takes it. The waiter's
    /// `force_release` with its stale judgement must then fail.
    #[test]
    fn stale_judgement_spares_the_slots_next_holder() {
        model(|| {
            let dead = Holder::new(DEAD_SLOT, 3);
            let successor = Holder::new(DEAD_SLOT, 4);
            let shared = Shared::new(3);
            shared.lock_forever(dead);
            shared.die();
            let waiter = {
                let shared = shared.clone();
                loom::thread::spawn(move || shared.critical_section(Holder::new(1, 1)))
            };
            shared.occupant.store(4, Ordering::SeqCst);
            shared.critical_section(successor);
            waiter.join().unwrap();
            assert_eq!(shared.protected(), 2);
            assert_eq!(*shared.broken.lock().unwrap(), vec![dead]);
            assert_eq!(shared.word.holder(), None);
        });
    }
}
