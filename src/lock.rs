//! A lock word in shared memory that knows which process holds it.
//!
//! State (32 bits): `0` = free; otherwise `holder_slot + 1` in the low 16 bits and
//! [`CONTENDED`] set when someone may be sleeping on it. Critical sections are short
//! (index updates, free-list surgery, never a payload copy), so a waiter spins briefly and
//! then sleeps on the futex. Because the holder's process slot is recorded, a waiter can
//! tell that the holder died (see `Channel::recover`) instead of waiting forever.
use std::time::Duration;

use crate::layout::LockWord;
use crate::sync::{spin_hint, Ordering};
use crate::wait::{futex_wait, futex_wake};

const CONTENDED: u32 = 1 << 31;
const HOLDER_MASK: u32 = 0xffff;
const SPINS: u32 = 200;

impl LockWord {
    /// Takes the lock for process slot `slot`. `stuck` runs every sleep interval with the
    /// current holder's slot; it may break a dead holder's lock by calling [`force_release`].
    pub fn lock(&self, slot: u16, mut stuck: impl FnMut(u16)) -> LockGuard<'_> {
        let me = u32::from(slot) + 1;
        // Acquire on success: pairs with the Release in `LockGuard::drop`, so the previous
        // holder's writes to the protected state are visible.
        if self
            .state
            .compare_exchange(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
        {
            return LockGuard { word: self };
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
                    return LockGuard { word: self };
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
                stuck(((after & HOLDER_MASK) - 1) as u16);
            }
        }
    }

    /// Frees a lock whose holder is known dead. The caller must repair what the holder may
    /// have left half-done before relying on the protected state.
    pub fn force_release(&self, dead_slot: u16) -> bool {
        let current = self.state.load(Ordering::Relaxed);
        if current & HOLDER_MASK != u32::from(dead_slot) + 1 {
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

    /// The slot holding the lock now, if any.
    pub fn holder(&self) -> Option<u16> {
        let current = self.state.load(Ordering::Relaxed) & HOLDER_MASK;
        (current != 0).then(|| (current - 1) as u16)
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
                        let _guard = word.lock(slot, |_| {});
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
        std::mem::forget(word.lock(7, |_| {}));
        assert_eq!(word.holder(), Some(7));
        let mut seen = None;
        let _guard = word.lock(1, |holder| {
            seen = Some(holder);
            assert!(word.force_release(holder));
        });
        assert_eq!(seen, Some(7));
        assert_eq!(word.holder(), Some(1));
    }
}
