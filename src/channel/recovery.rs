//! Crash recovery: noticing processes that died without closing, and taking back what
//! they held.
//!
//! Every block records who is responsible for it (`BlockHeader::owner`, with the tenure
//! of the slot: a reused slot never inherits blocks): the producer while it fills it
//! (`SENDER`) and pushes it (`QUEUED`), the consumer that took it (`RECEIVER`, set under
//! the ring lock before `head` moves), or the process an `alloc` buffer belongs to
//! (`ALLOC`). A process that exits without closing is noticed within about 100 ms by the
//! other processes' watcher threads (see `watcher.rs`) and by any peer blocked in a call:
//! `reap_dead` drops its handles and pending entries, and `reclaim` frees what it held,
//! except blocks still in the ring, which stay for the other consumers:
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
//! A producer waiting for memory is such a blocked peer, so memory held by a dead consumer
//! returns at the latest when a producer needs it, and usually ~100 ms after the death.
use std::collections::HashSet;

use super::{Channel, REAP_INTERVAL};
use crate::error::Error;
use crate::procs::SlotId;
use crate::slab::block::{
    owner_kind, owner_slot, OWNER_ALLOC, OWNER_QUEUED, OWNER_RECEIVER, OWNER_SENDER,
};
use crate::sync::Ordering;

impl Channel {
    /// Notices peers that died without closing (rate-limited).
    pub fn reap_if_due(&self) {
        let now = monotonic_millis();
        let last = self.last_reap.load(Ordering::Relaxed);
        // Relaxed: the stamp only rate-limits; whoever wins the exchange does the reaping.
        if now.saturating_sub(last) < REAP_INTERVAL.as_millis() as u64
            || self
                .last_reap
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        #[cfg(feature = "failpoints")]
        if std::env::var_os("TENSORSLAB_FAILPOINT_NO_REAP").is_some() {
            return; // the failpoint matrix decides who reaps, with `reap_now`
        }
        // Relaxed: a statistic.
        self.control().sweep.count.fetch_add(1, Ordering::Relaxed);
        self.reap_now();
    }

    /// Looks for dead peers now and takes back what they held; returns how many slots were
    /// freed.
    pub fn reap_now(&self) -> usize {
        self.control()
            .reap_dead(|process| process.liveness(), |dead| self.reclaim(dead))
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
