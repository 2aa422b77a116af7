//! The process table: which processes use a channel, how many handles each holds, and
//! handles in transit (pickled, or inherited by a fork child not yet registered).
//!
//! A slot's `state` is `generation << 32 | pid`. Claiming goes through the transient pid
//! [`CLAIMING`] so other processes never read a half-initialised slot; reaping a dead
//! process goes through [`REAPING`] so it happens exactly once.
//!
//! Open handles are counted twice: per slot (so a dead process's share can be subtracted)
//! and in `HandleState` totals (so the hot path reads one word). A process that exits
//! without closing is noticed by a liveness check (pid plus start time), never by waiting
//! for it.
use crate::error::{Error, Result};
use crate::layout::{ControlBlock, HandleState, ProcessSlot, MAX_PENDING};
use crate::shm::ProcessId;
use crate::sync::Ordering;
use crate::wait::futex_wake;

const CLAIMING: u32 = u32::MAX;
const REAPING: u32 = u32::MAX - 1;

/// Which side a handle is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Sender,
    Receiver,
}

fn pid_of(state: u64) -> u32 {
    state as u32
}

fn is_live_pid(pid: u32) -> bool {
    pid != 0 && pid != CLAIMING && pid != REAPING
}

impl ProcessSlot {
    pub fn pid(&self) -> Option<u32> {
        let pid = pid_of(self.state.load(Ordering::Acquire));
        is_live_pid(pid).then_some(pid)
    }

    pub fn process(&self) -> Option<ProcessId> {
        self.pid().map(|pid| ProcessId {
            pid,
            start_time: self.start_time.load(Ordering::Relaxed),
        })
    }

    fn count(&self, side: Side) -> &crate::sync::AtomicU32 {
        match side {
            Side::Sender => &self.senders,
            Side::Receiver => &self.receivers,
        }
    }
}

impl HandleState {
    fn total(&self, side: Side) -> &crate::sync::AtomicU32 {
        match side {
            Side::Sender => &self.senders,
            Side::Receiver => &self.receivers,
        }
    }

    /// Open handles on `side`, over all processes, pending ones included.
    pub fn open(&self, side: Side) -> u32 {
        // Acquire: pairs with the Release updates in `add`/`remove`.
        self.total(side).load(Ordering::Acquire)
    }
}

impl ControlBlock {
    /// Claims a free slot for process `me`, publishing its control descriptor.
    pub fn claim_slot(&self, me: ProcessId, control_fd: i32) -> Result<u16> {
        for (index, slot) in self.processes.iter().enumerate() {
            let state = slot.state.load(Ordering::Relaxed);
            if pid_of(state) != 0 {
                continue;
            }
            let claiming = (state & !0xffff_ffff) | u64::from(CLAIMING);
            // Acquire: see the previous owner's final stores before reinitialising.
            if slot
                .state
                .compare_exchange(state, claiming, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            slot.start_time.store(me.start_time, Ordering::Relaxed);
            slot.senders.store(0, Ordering::Relaxed);
            slot.receivers.store(0, Ordering::Relaxed);
            slot.outstanding.store(0, Ordering::Relaxed);
            slot.ack_waiters.store(0, Ordering::Relaxed);
            slot.control_fd.store(control_fd, Ordering::Relaxed);
            for fd in slot.segment_fds.iter() {
                fd.store(-1, Ordering::Relaxed);
            }
            let generation = (state >> 32).wrapping_add(1);
            // Release: every field above is initialised before the slot reads as live
            // (pairs with the Acquire in `ProcessSlot::pid`).
            slot.state
                .store(generation << 32 | u64::from(me.pid), Ordering::Release);
            return Ok(index as u16);
        }
        Err(Error::Full(format!(
            "channel already has {} processes attached; close handles in processes that no longer use it",
            self.processes.len()
        )))
    }

    /// Gives a slot back when its process detaches cleanly (no handles, nothing in flight
    /// that it is waiting on).
    pub fn release_slot(&self, index: u16) {
        let slot = &self.processes[usize::from(index)];
        let state = slot.state.load(Ordering::Relaxed);
        slot.control_fd.store(-1, Ordering::Relaxed);
        // Release: our last uses of the slot happen before it can be claimed again.
        slot.state.store(state & !0xffff_ffff, Ordering::Release);
    }

    /// Adds `count` open handles on `side` for slot `index`.
    pub fn add_handles(&self, index: u16, side: Side, count: u32) {
        if count == 0 {
            return;
        }
        self.processes[usize::from(index)]
            .count(side)
            .fetch_add(count, Ordering::Relaxed);
        // Release: pairs with the Acquire in `HandleState::open`.
        self.handles.total(side).fetch_add(count, Ordering::Release);
        self.handles_changed();
    }

    /// Removes `count` handles on `side` held by slot `index`.
    pub fn remove_handles(&self, index: u16, side: Side, count: u32) {
        if count == 0 {
            return;
        }
        let slot = self.processes[usize::from(index)].count(side);
        let _ = slot.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
            Some(n.saturating_sub(count))
        });
        let _ = self
            .handles
            .total(side)
            .fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(count))
            });
        self.handles_changed();
    }

    /// Wakes every waiter so it re-checks who is still open.
    pub fn handles_changed(&self) {
        // SeqCst on the bumps: pairs with the SeqCst waiter registration in
        // `Channel::wait` (a waiter either sees the new value or is woken).
        self.handles.changed.fetch_add(1, Ordering::SeqCst);
        self.ring.pushed.fetch_add(1, Ordering::SeqCst);
        self.ring.popped.fetch_add(1, Ordering::SeqCst);
        self.heap.freed.fetch_add(1, Ordering::SeqCst);
        futex_wake(&self.ring.pushed, i32::MAX);
        futex_wake(&self.ring.popped, i32::MAX);
        futex_wake(&self.heap.freed, i32::MAX);
        for slot in self.processes.iter() {
            if slot.ack_waiters.load(Ordering::SeqCst) > 0 {
                slot.acked.fetch_add(1, Ordering::SeqCst);
                futex_wake(&slot.acked, i32::MAX);
            }
        }
    }

    /// Records handles in transit, owned by slot `index` until the token is redeemed.
    /// Returns the token.
    pub fn add_pending(&self, index: u16, senders: u8, receivers: u8, token: u32) -> Result<u64> {
        let token = u64::from(token.max(1));
        let entry =
            token << 32 | u64::from(senders) << 24 | u64::from(receivers) << 16 | u64::from(index);
        for cell in self.handles.pending.iter() {
            if cell
                .compare_exchange(0, entry, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.handles
                    .senders
                    .fetch_add(u32::from(senders), Ordering::Release);
                self.handles
                    .receivers
                    .fetch_add(u32::from(receivers), Ordering::Release);
                return Ok(entry);
            }
        }
        Err(Error::Full(format!(
            "{MAX_PENDING} handles of this channel are pickled or forked and not yet attached by their new process"
        )))
    }

    /// Redeems a pending entry (the new process now counts its own handles). False if it
    /// was already redeemed or dropped (its owner died, or the pickle was loaded twice).
    pub fn redeem_pending(&self, entry: u64) -> bool {
        for cell in self.handles.pending.iter() {
            if cell
                .compare_exchange(entry, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.drop_pending_counts(entry);
                return true;
            }
        }
        false
    }

    fn drop_pending_counts(&self, entry: u64) {
        let senders = (entry >> 24 & 0xff) as u32;
        let receivers = (entry >> 16 & 0xff) as u32;
        let _ = self
            .handles
            .senders
            .fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(senders))
            });
        let _ = self
            .handles
            .receivers
            .fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                Some(n.saturating_sub(receivers))
            });
        self.handles_changed();
    }

    /// Finds processes that died without detaching and takes back what they held open.
    /// `reclaim(slot)` runs for each, before its slot is freed. Returns how many were reaped.
    pub fn reap_dead(&self, mut reclaim: impl FnMut(u16)) -> usize {
        let mut reaped = 0;
        for (index, slot) in self.processes.iter().enumerate() {
            let state = slot.state.load(Ordering::Acquire);
            let pid = pid_of(state);
            if !is_live_pid(pid) {
                continue;
            }
            let id = ProcessId {
                pid,
                start_time: slot.start_time.load(Ordering::Relaxed),
            };
            if id.is_alive() {
                continue;
            }
            let reaping = (state & !0xffff_ffff) | u64::from(REAPING);
            if slot
                .state
                .compare_exchange(state, reaping, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let index = index as u16;
            let senders = slot.senders.swap(0, Ordering::Relaxed);
            let receivers = slot.receivers.swap(0, Ordering::Relaxed);
            for cell in self.handles.pending.iter() {
                let entry = cell.load(Ordering::Acquire);
                if entry != 0
                    && entry as u16 == index
                    && cell
                        .compare_exchange(entry, 0, Ordering::AcqRel, Ordering::Relaxed)
                        .is_ok()
                {
                    self.drop_pending_counts(entry);
                }
            }
            reclaim(index);
            let _ = self
                .handles
                .senders
                .fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(senders))
                });
            let _ =
                self.handles
                    .receivers
                    .fetch_update(Ordering::Release, Ordering::Relaxed, |n| {
                        Some(n.saturating_sub(receivers))
                    });
            slot.control_fd.store(-1, Ordering::Relaxed);
            // Release: the reclaim above is complete before the slot can be claimed again.
            slot.state.store(state & !0xffff_ffff, Ordering::Release);
            reaped += 1;
            self.handles_changed();
        }
        reaped
    }

    /// Pids of the processes attached now (for messages and stats).
    pub fn pids(&self, side: Option<Side>) -> Vec<u32> {
        self.processes
            .iter()
            .filter(|slot| side.is_none_or(|side| slot.count(side).load(Ordering::Relaxed) > 0))
            .filter_map(ProcessSlot::pid)
            .collect()
    }
}
