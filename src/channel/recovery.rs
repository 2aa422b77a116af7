//! Crash recovery: noticing processes that died without closing, and taking back what
//! they held.
//!
//! Every block records who is responsible for it (`BlockHeader::owner`, with the tenure
//! of the slot: a reused slot never inherits blocks): the producer while it fills it
//! (`SENDER`) and pushes it (`QUEUED`), the consumer that took it (`RECEIVER`, set under
//! the ring lock before `head` moves), or the process an `alloc` buffer belongs to
//! (`ALLOC`). A process that exits without closing is noticed within about 100 ms by a
//! sweep (see below): `reap_dead` drops its handles and pending entries, and `reclaim`
//! frees what it held, except blocks still in the ring, which stay for the other
//! consumers:
//!
//! - a message it had taken is freed with the references it held to `alloc` buffers:
//!   delivery is *at most once* to a consumer that dies, exactly once otherwise;
//! - a put it had not published is freed; nobody saw it (no partial message is visible);
//! - its own hold on an `alloc` buffer is dropped (once: it is a bit, see `slab::refs`);
//!   messages holding the buffer keep it.
//!
//! Each of these is one critical section of the heap lock and changes the block's state
//! or owner, so `reclaim` is idempotent: a reaper that dies half-way is taken over by the
//! next one (see `procs`), which runs it again and finds only what is left to do.
//!
//! # Sharing the sweep
//!
//! A sweep judges every peer, so if each of n processes swept every interval the channel
//! would pay n² checks per interval. Instead the channel holds the time its next sweep is
//! due (`SweepState::due`); a process that finds it passed claims the sweep by moving it one
//! interval on (a CAS: one winner) and sweeps. The processes asking are the watcher threads
//! (see `watcher.rs`: the one of the process that claimed last, by its watcher or by a
//! blocked call, comes back at the next due time, however early something woke it; the
//! others only every second, as stand-ins) and every call blocked in a wait, at each of
//! its wake-ups. So a sweep runs about every interval whoever is left: nothing is held while
//! sweeping, and a sweeper that stops or dies half-way only means the next claimant, one
//! interval later, sweeps again (resuming the reap it left, see `procs`). A blocked call
//! notices a dead peer within about an interval as before, by the sweep of whoever claimed
//! it (the reap wakes every waiter) or by its own claim.
//!
//! A producer waiting for memory is such a blocked peer, so memory held by a dead consumer
//! returns at the latest when a producer needs it, and usually ~100 ms after the death.
use std::collections::HashSet;
use std::time::Duration;

use super::{Channel, REAP_INTERVAL};
use crate::error::Error;
use crate::procs::SlotId;
use crate::shm::Census;
use crate::slab::block::{
    owner_kind, owner_slot, OWNER_ALLOC, OWNER_QUEUED, OWNER_RECEIVER, OWNER_SENDER,
};
use crate::sync::Ordering;

impl Channel {
    /// Sweeps for peers that died without closing if the channel's next sweep is due,
    /// claiming it (see "Sharing the sweep" in the module docs); also resumes a reap this
    /// process left unfinished. True when this process claimed the sweep.
    pub fn reap_if_due(&self) -> bool {
        #[cfg(feature = "failpoints")]
        if std::env::var_os("TENSORSLAB_FAILPOINT_NO_REAP").is_some() {
            return false; // the failpoint matrix decides who reaps, with `reap_now`
        }
        let sweep = &self.control().sweep;
        let interval = REAP_INTERVAL.as_millis() as u64;
        let now = monotonic_millis();
        // Relaxed: the word only schedules sweeps; what a sweep reads is ordered by the
        // slot states' own Acquire loads.
        let due = sweep.due.load(Ordering::Relaxed);
        // A due time more than two intervals ahead was set by a clock that is not ours (a
        // peer in another time namespace): ours decides, so sweeps never stop for it.
        let on_time = now < due && due - now <= 2 * interval;
        let claimed = !on_time
            && sweep
                .due
                .compare_exchange(due, now + interval, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok();
        if claimed {
            // Relaxed: only this process reads it, to compare with the shared due time.
            self.claimed_due.store(now + interval, Ordering::Relaxed);
            crate::failpoint!("sweep.claimed");
            // Relaxed: a statistic.
            sweep.count.fetch_add(1, Ordering::Relaxed);
        }
        // Relaxed: only this process sets and reads it.
        if claimed || self.reap_unfinished.load(Ordering::Relaxed) {
            self.reap_now();
        }
        claimed
    }

    /// How long until the sweep this process claimed last is due again, while no other
    /// process has claimed one since (this process is then the sweeper, whichever of its
    /// threads claimed: the watcher or a blocked call); `None` otherwise.
    pub fn own_sweep_due_in(&self) -> Option<Duration> {
        // Relaxed: as in `reap_if_due`.
        let mine = self.claimed_due.load(Ordering::Relaxed);
        if mine == 0 || self.control().sweep.due.load(Ordering::Relaxed) != mine {
            return None;
        }
        Some(Duration::from_millis(
            mine.saturating_sub(monotonic_millis()),
        ))
    }

    /// Looks for dead peers now and takes back what they held; returns how many slots were
    /// freed.
    pub fn reap_now(&self) -> usize {
        // Cleared first and set on failure, so of two sweeps in this process at once the
        // flag ends set if either left a reap unfinished (a needless resume at worst).
        self.reap_unfinished.store(false, Ordering::Relaxed);
        let census = Census::take();
        self.control().reap_dead(
            |process| census.liveness(process),
            |dead| {
                let done = self.reclaim(dead);
                if !done {
                    self.reap_unfinished.store(true, Ordering::Relaxed);
                }
                done
            },
        )
    }

    /// Takes back the memory a dead process held (see "Crash recovery" in the module docs).
    /// Idempotent: run again (by a reaper taking over), it finds only what is left. False
    /// when it could not finish: a lock wait reached the deadline of the call it runs in
    /// (the slot then stays being reaped, and the next reap resumes it).
    pub(super) fn reclaim(&self, dead: SlotId) -> bool {
        if self.kind().fans_out() && !self.reclaim_fan_out(dead) {
            return false;
        }
        let Ok(queued) = self.slab.lock(&self.control().ring_lock).map(|_guard| {
            self.ring()
                .queued()
                .map(|entry| entry.block)
                .collect::<HashSet<u64>>()
        }) else {
            return false;
        };
        crate::failpoint!("reclaim.after_ring_snapshot");
        // Every segment, or the walk would miss the dead process's blocks in one.
        if self.slab.attach_all().is_err() {
            return false;
        }
        let Ok(used) = self.slab.used_blocks() else {
            return false;
        };
        for (block, owner) in used {
            if owner_slot(owner) != dead || queued.contains(&block.0) {
                continue;
            }
            let outcome = match owner_kind(owner) {
                // A message it had taken: its views died with it.
                OWNER_RECEIVER => self
                    .slab
                    .free_message_owned_by(block, owner)
                    .map(|origin| self.uncount_outstanding(origin)),
                // A put it never finished: nobody else has seen the block.
                OWNER_SENDER | OWNER_QUEUED => {
                    self.slab.free_message_owned_by(block, owner).map(drop)
                }
                // Its own hold on an `alloc` buffer; messages may still hold it.
                OWNER_ALLOC => self.slab.drop_creator_owned_by(block, owner),
                _ => Ok(()),
            };
            // A timed-out lock wait; other errors (the block changed hands) are final.
            if matches!(outcome, Err(Error::Full(_) | Error::Empty(_))) {
                return false;
            }
            crate::failpoint!("reclaim.after_block");
        }
        true
    }
}

/// Milliseconds of `CLOCK_MONOTONIC` (shared by every thread, unaffected by fork).
fn monotonic_millis() -> u64 {
    // SAFETY: `timespec` is plain old data that clock_gettime fills.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: a valid clock id and a pointer to a live `timespec`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1000 + now.tv_nsec as u64 / 1_000_000
}
