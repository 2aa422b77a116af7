//! The process table: which processes use a channel, how many handles each holds, and
//! handles in transit (pickled, or inherited by a fork child not yet registered).
//!
//! # The slot state word
//!
//! `ProcessSlot::state` is `generation:32 | phase:2 | pid:30`:
//!
//! | phase      | pid            | meaning                                            |
//! |------------|----------------|----------------------------------------------------|
//! | `LIVE`     | 0              | free                                               |
//! | `LIVE`     | occupant       | in use by that process                             |
//! | `CLAIMING` | claimant       | being initialised; reset if the claimant dies       |
//! | `REAPING`  | reaper         | its dead occupant is being reaped; taken over (and  |
//! |            |                | the reap resumed) if the reaper dies too           |
//!
//! The generation rises by one on every completed claim and never changes otherwise. Every
//! word elsewhere in shared memory that names a slot (block owners, lock holders, pending
//! entries, message origins) carries its generation too, so a slot reused by a new process
//! is never mistaken for the process that held it before (ABA).
//!
//! # Counting handles
//!
//! Open handles are counted once, per slot; totals are sums over live slots plus the
//! pending entries, never stored, so no death between two stores can leave a total wrong.
//! A slot stops counting the moment it leaves `LIVE` (its process is being reaped).
//!
//! A process that exits without closing is noticed by a liveness check (see
//! `shm::process`): only a definite answer reaps it, and no process ever reaps itself.
use crate::error::{Error, Result};
use crate::layout::{ControlBlock, ProcessSlot, MAX_PENDING};
use crate::shm::{current_pid, Liveness, ProcessId};
use crate::sync::{AtomicU32, Ordering};
use crate::wait::futex_wake;

const PID_MASK: u64 = (1 << 30) - 1;
const PHASE_SHIFT: u32 = 30;
const PHASE_LIVE: u64 = 0;
const PHASE_CLAIMING: u64 = 1;
const PHASE_REAPING: u64 = 2;

/// Which side a handle is on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Sender,
    Receiver,
}

/// A slot together with the generation of its occupant: names one process's tenure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SlotId {
    pub index: u16,
    pub generation: u32,
}

impl SlotId {
    /// `generation:32 | index:16`, as stored by `Slab` and in block owner words.
    pub fn pack(self) -> u64 {
        u64::from(self.generation) << 16 | u64::from(self.index)
    }

    pub fn unpack(word: u64) -> SlotId {
        SlotId {
            index: word as u16,
            generation: (word >> 16) as u32,
        }
    }
}

fn state_word(generation: u32, phase: u64, pid: u32) -> u64 {
    u64::from(generation) << 32 | phase << PHASE_SHIFT | (u64::from(pid) & PID_MASK)
}

fn phase_of(state: u64) -> u64 {
    (state >> PHASE_SHIFT) & 3
}

fn pid_of(state: u64) -> u32 {
    (state & PID_MASK) as u32
}

fn generation_of(state: u64) -> u32 {
    (state >> 32) as u32
}

/// The live occupant in `state`, if any.
fn live_pid(state: u64) -> Option<u32> {
    let pid = pid_of(state);
    (phase_of(state) == PHASE_LIVE && pid != 0).then_some(pid)
}

/// A consistent reading of a live slot: its state word and the identity of its process.
#[derive(Clone, Copy, Debug)]
pub struct Occupant {
    pub state: u64,
    pub process: ProcessId,
    pub slot: SlotId,
}

impl ProcessSlot {
    pub fn pid(&self) -> Option<u32> {
        // Acquire: pairs with the Release store that made the slot live in `claim_slot`.
        live_pid(self.state.load(Ordering::Acquire))
    }

    /// The live occupant, with its start time read consistently: the state word is read
    /// before and after the start time (a seqlock), so a claim in between is never paired
    /// with the previous occupant's pid.
    pub fn occupant(&self, index: u16) -> Option<Occupant> {
        for _ in 0..16 {
            // Acquire on all three: the second state load cannot move before the start-time
            // load. Pairs with the Release stores of `claim_slot` (start time, then state).
            let before = self.state.load(Ordering::Acquire);
            let pid = live_pid(before)?;
            let start_time = self.start_time.load(Ordering::Acquire);
            if self.state.load(Ordering::Acquire) == before {
                return Some(Occupant {
                    state: before,
                    process: ProcessId { pid, start_time },
                    slot: SlotId {
                        index,
                        generation: generation_of(before),
                    },
                });
            }
        }
        None
    }

    /// True while the slot is held by the tenure `id` (same generation, still live).
    pub fn is_tenure(&self, id: SlotId) -> bool {
        let state = self.state.load(Ordering::Acquire);
        live_pid(state).is_some() && generation_of(state) == id.generation
    }

    fn count(&self, side: Side) -> &AtomicU32 {
        match side {
            Side::Sender => &self.senders,
            Side::Receiver => &self.receivers,
        }
    }
}

/// A pending entry: `redeeming:1 | token:23 | generation:8 | senders:8 | receivers:8 |
/// slot:16`. The slot (and low 8 bits of its generation) is the process answerable for the
/// entry: the issuer until a redeemer takes it over (setting `redeeming`), then the
/// redeemer. Either one's death drops the entry.
mod pending {
    use super::SlotId;

    pub const REDEEMING: u64 = 1 << 63;
    const TOKEN_MASK: u64 = (1 << 23) - 1;

    pub fn entry(owner: SlotId, senders: u8, receivers: u8, token: u32) -> u64 {
        let token = (u64::from(token) & TOKEN_MASK).max(1);
        token << 40
            | u64::from(owner.generation as u8) << 32
            | u64::from(senders) << 24
            | u64::from(receivers) << 16
            | u64::from(owner.index)
    }

    pub fn with_owner(entry: u64, owner: SlotId) -> u64 {
        (entry & !0xff_0000_ffff)
            | REDEEMING
            | u64::from(owner.generation as u8) << 32
            | u64::from(owner.index)
    }

    pub fn owned_by(entry: u64, owner: SlotId) -> bool {
        entry != 0 && entry as u16 == owner.index && (entry >> 32) as u8 == owner.generation as u8
    }

    pub fn token(entry: u64) -> u32 {
        (entry >> 40 & TOKEN_MASK) as u32
    }

    pub fn senders(entry: u64) -> u32 {
        (entry >> 24 & 0xff) as u32
    }

    pub fn receivers(entry: u64) -> u32 {
        (entry >> 16 & 0xff) as u32
    }
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Sender => 0,
        Side::Receiver => 1,
    }
}

impl ControlBlock {
    /// Pid of the last process that died holding handles on `side`, if no handle opened
    /// on that side since (see `HandleState::last_dead`).
    pub fn died_last(&self, side: Side) -> Option<u32> {
        let pid = self.handles.last_dead[side_index(side)].load(Ordering::Acquire);
        (pid != 0).then_some(pid)
    }

    /// Claims a free slot for process `me`, publishing its control descriptor.
    pub fn claim_slot(&self, me: ProcessId, control_fd: i32) -> Result<SlotId> {
        for (index, slot) in self.processes.iter().enumerate() {
            let state = slot.state.load(Ordering::Relaxed);
            if phase_of(state) != PHASE_LIVE || pid_of(state) != 0 {
                continue;
            }
            let generation = generation_of(state);
            let claiming = state_word(generation, PHASE_CLAIMING, me.pid);
            // Acquire: see the previous owner's final stores before reinitialising.
            if slot
                .state
                .compare_exchange(state, claiming, Ordering::Acquire, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            // Release: a seqlock reader that sees this start time also sees the state
            // leave LIVE (pairs with the Acquire loads in `ProcessSlot::occupant`).
            slot.start_time.store(me.start_time, Ordering::Release);
            slot.senders.store(0, Ordering::Relaxed);
            slot.receivers.store(0, Ordering::Relaxed);
            slot.outstanding.store(0, Ordering::Relaxed);
            slot.ack_waiters.store(0, Ordering::Relaxed);
            slot.control_fd.store(control_fd, Ordering::Relaxed);
            for fd in slot.segment_fds.iter() {
                fd.store(-1, Ordering::Relaxed);
            }
            // Relaxed: only bounds scans; a scan that misses a slot still being claimed
            // misses nothing it could count.
            self.handles
                .slots_used
                .fetch_max(index as u32 + 1, Ordering::Relaxed);
            let generation = generation.wrapping_add(1);
            // Release: every field above is initialised before the slot reads as live
            // (pairs with the Acquire in `ProcessSlot::pid`/`occupant`). A CAS, not a
            // store: a peer that judged this claimant dead may have reset the slot.
            if slot
                .state
                .compare_exchange(
                    claiming,
                    state_word(generation, PHASE_LIVE, me.pid),
                    Ordering::Release,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            return Ok(SlotId {
                index: index as u16,
                generation,
            });
        }
        Err(Error::Limit(format!(
            "channel already has {} processes attached, the most it can have; close handles in processes that no longer use it",
            self.processes.len()
        )))
    }

    /// Gives a slot back when its process detaches cleanly (no handles, nothing in flight
    /// that it is waiting on).
    pub fn release_slot(&self, id: SlotId) {
        let slot = &self.processes[usize::from(id.index)];
        let state = slot.state.load(Ordering::Relaxed);
        if generation_of(state) != id.generation || live_pid(state).is_none() {
            return;
        }
        slot.control_fd.store(-1, Ordering::Relaxed);
        // Release: our last uses of the slot happen before it can be claimed again. A CAS:
        // a peer may have judged us dead and be reaping the slot.
        let _ = slot.state.compare_exchange(
            state,
            state_word(id.generation, PHASE_LIVE, 0),
            Ordering::Release,
            Ordering::Relaxed,
        );
    }

    /// The slots worth scanning: every slot ever claimed lies below this.
    fn used_slots(&self) -> &[ProcessSlot] {
        let used = self.handles.slots_used.load(Ordering::Relaxed) as usize;
        &self.processes[..used.min(self.processes.len())]
    }

    /// Adds `count` open handles on `side` for slot `index`.
    pub fn add_handles(&self, index: u16, side: Side, count: u32) {
        if count == 0 {
            return;
        }
        // Release: pairs with the Acquire loads in `open`.
        self.processes[usize::from(index)]
            .count(side)
            .fetch_add(count, Ordering::Release);
        self.handles.last_dead[side_index(side)].store(0, Ordering::Release);
        self.handles_changed();
    }

    /// Removes `count` handles on `side` held by slot `index`.
    pub fn remove_handles(&self, index: u16, side: Side, count: u32) {
        if count == 0 {
            return;
        }
        let _ = self.processes[usize::from(index)].count(side).fetch_update(
            Ordering::Release,
            Ordering::Relaxed,
            |n| Some(n.saturating_sub(count)),
        );
        self.handles_changed();
    }

    /// Open handles on `side`: those of live slots plus pending ones.
    pub fn open(&self, side: Side) -> u32 {
        let live: u32 = self
            .used_slots()
            .iter()
            .filter(|slot| slot.pid().is_some())
            // Acquire: pairs with the Release updates in `add_handles`/`remove_handles`.
            .map(|slot| slot.count(side).load(Ordering::Acquire))
            .fold(0, u32::saturating_add);
        live.saturating_add(self.pending_count(side))
    }

    /// True when any handle on `side` is open (stops at the first one found).
    pub fn any_open(&self, side: Side) -> bool {
        self.used_slots()
            .iter()
            .any(|slot| slot.pid().is_some() && slot.count(side).load(Ordering::Acquire) > 0)
            || self.pending_count(side) > 0
    }

    fn pending_count(&self, side: Side) -> u32 {
        self.handles
            .pending
            .iter()
            // Acquire: pairs with the AcqRel exchanges that fill and empty the cells.
            .map(|cell| cell.load(Ordering::Acquire))
            .filter(|&entry| entry != 0)
            .map(|entry| match side {
                Side::Sender => pending::senders(entry),
                Side::Receiver => pending::receivers(entry),
            })
            .fold(0, u32::saturating_add)
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
        for slot in self.used_slots() {
            if slot.ack_waiters.load(Ordering::SeqCst) > 0 {
                slot.acked.fetch_add(1, Ordering::SeqCst);
                futex_wake(&slot.acked, i32::MAX);
            }
        }
    }

    /// Records handles in transit, answerable to `owner` until the token is redeemed.
    /// Returns the entry (the ticket's proof).
    pub fn add_pending(
        &self,
        owner: SlotId,
        senders: u8,
        receivers: u8,
        token: u32,
    ) -> Result<u64> {
        let entry = pending::entry(owner, senders, receivers, token);
        for cell in self.handles.pending.iter() {
            // AcqRel: pairs with the Acquire loads of `pending_count` and the reaper.
            if cell
                .compare_exchange(0, entry, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.handles_changed();
                return Ok(entry);
            }
        }
        Err(Error::Limit(format!(
            "{MAX_PENDING} handles of this channel are pickled or forked and not yet attached by their new process"
        )))
    }

    /// Makes `redeemer` answerable for a pending entry it is about to redeem, so that if it
    /// dies before redeeming, its reaper drops the entry (the issuer may live on, and would
    /// keep the channel open for a handle nobody has). Called right after the redeemer
    /// claims its slot. False if the entry is gone (redeemed, withdrawn, or dropped).
    pub fn adopt_pending(&self, entry: u64, redeemer: SlotId) -> bool {
        let taken = pending::with_owner(entry, redeemer);
        self.handles.pending.iter().any(|cell| {
            cell.load(Ordering::Acquire) == taken
                || cell
                    .compare_exchange(entry, taken, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok()
        })
    }

    /// Redeems a pending entry for `redeemer`: adopts it (unless `adopt_pending` did), runs
    /// `open` (which counts the redeemer's own handles), then clears it. False if it was
    /// already redeemed or dropped (its issuer died, or the pickle was loaded twice); `open`
    /// runs all the same.
    pub fn redeem_pending(&self, entry: u64, redeemer: SlotId, open: impl FnOnce()) -> bool {
        let taken = pending::with_owner(entry, redeemer);
        let adopted = self.adopt_pending(entry, redeemer);
        open();
        if !adopted {
            return false;
        }
        // If we die between `open` and here, our reaper drops both our counts and the entry.
        let cleared = self.handles.pending.iter().any(|cell| {
            cell.compare_exchange(taken, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        self.handles_changed();
        cleared
    }

    /// The cell holding pending entry `entry` now, if any.
    pub fn pending_cell(&self, entry: u64) -> Option<usize> {
        self.handles
            .pending
            .iter()
            .position(|cell| cell.load(Ordering::Acquire) == entry)
    }

    /// The token of the entry in pending cell `index` (0 when empty): a ticket's entry
    /// keeps its token from issue to redemption, whoever is answerable for it.
    pub fn pending_token(&self, index: usize) -> u32 {
        self.handles
            .pending
            .get(index)
            .map_or(0, |cell| match cell.load(Ordering::Acquire) {
                0 => 0,
                entry => pending::token(entry),
            })
    }

    /// The token of a pending entry.
    pub fn token_of(entry: u64) -> u32 {
        pending::token(entry)
    }

    /// Withdraws a pending entry that will never be redeemed. False if it is gone already.
    pub fn withdraw_pending(&self, entry: u64) -> bool {
        let found = self.handles.pending.iter().any(|cell| {
            cell.compare_exchange(entry, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        });
        if found {
            self.handles_changed();
        }
        found
    }

    /// Finds processes that died without detaching (and reaps left half-done by reapers
    /// that died, or by this process) and takes back what they held. `reclaim(tenure)` runs
    /// for each before its slot is freed; it must be idempotent, since a reap whose reaper
    /// dies is run again by another process, and returns false when it could not finish
    /// (the slot then stays being reaped by this process, resumed at its next reap). `liveness` judges a process (`ProcessId::liveness` outside tests).
    /// Returns how many slots were freed.
    pub fn reap_dead(
        &self,
        liveness: impl Fn(&ProcessId) -> Liveness,
        mut reclaim: impl FnMut(SlotId) -> bool,
    ) -> usize {
        let me = current_pid();
        let mut reaped = 0;
        for (index, slot) in self.used_slots().iter().enumerate() {
            let state = slot.state.load(Ordering::Acquire);
            let pid = pid_of(state);
            let generation = generation_of(state);
            let phase = phase_of(state);
            // Resume its own reap that did not finish. Its own live slots are judged like
            // any (`liveness` never calls this process dead; an earlier process that had
            // its pid, with another start time, is).
            let own_reap = phase == PHASE_REAPING && pid == me;
            if pid == 0 || phase > PHASE_REAPING || (phase == PHASE_CLAIMING && pid == me) {
                continue;
            }
            // Whose death this is about: the occupant (LIVE), the claimant (CLAIMING) or the
            // reaper (REAPING). Claimants and reapers are checked by pid alone: their start
            // time is not recorded, and a reused pid only delays the take-over.
            let judged = match phase {
                _ if own_reap => Liveness::Dead,
                PHASE_LIVE => match slot.occupant(index as u16) {
                    Some(occupant) if occupant.state == state => liveness(&occupant.process),
                    _ => continue,
                },
                _ => pid_liveness(pid, &liveness),
            };
            if judged != Liveness::Dead {
                continue;
            }
            let tenure = SlotId {
                index: index as u16,
                generation,
            };
            if phase == PHASE_CLAIMING {
                // The claimant held nothing yet: free the slot again.
                reaped += usize::from(free_slot(slot, state, generation));
                continue;
            }
            let reaping = state_word(generation, PHASE_REAPING, me);
            // AcqRel: whoever wins reaps; the Acquire half sees the dead process's stores.
            if !own_reap
                && slot
                    .state
                    .compare_exchange(state, reaping, Ordering::AcqRel, Ordering::Relaxed)
                    .is_err()
            {
                continue;
            }
            for side in [Side::Sender, Side::Receiver] {
                // Only when the occupant itself is judged here (a take-over's pid is the
                // reaper's).
                if phase == PHASE_LIVE && slot.count(side).load(Ordering::Acquire) > 0 {
                    // Release: pairs with the Acquire load in `died_last`.
                    self.handles.last_dead[side_index(side)].store(pid, Ordering::Release);
                }
            }
            crate::failpoint!("reap.claimed");
            // Its handles stopped counting when the slot left LIVE; wake the waiters.
            self.handles_changed();
            for cell in self.handles.pending.iter() {
                let entry = cell.load(Ordering::Acquire);
                if pending::owned_by(entry, tenure) {
                    let _ = cell.compare_exchange(entry, 0, Ordering::AcqRel, Ordering::Relaxed);
                }
            }
            if !reclaim(tenure) {
                continue;
            }
            crate::failpoint!("reap.reclaimed");
            slot.control_fd.store(-1, Ordering::Relaxed);
            reaped += usize::from(free_slot(slot, reaping, generation));
            self.handles_changed();
        }
        reaped
    }

    /// Pids of the processes attached now (for messages and stats).
    pub fn pids(&self, side: Option<Side>) -> Vec<u32> {
        self.used_slots()
            .iter()
            .filter(|slot| side.is_none_or(|side| slot.count(side).load(Ordering::Relaxed) > 0))
            .filter_map(ProcessSlot::pid)
            .collect()
    }

    /// Whether the tenure of slot `index` whose generation's low bits (under `mask`) are
    /// `generation` is over for sure: the slot moved on (another generation, free, being
    /// reaped) or its process is definitely dead. Used to break locks (which keep only the
    /// low bits of the generation).
    pub fn tenure_over(
        &self,
        index: u16,
        generation: u32,
        mask: u32,
        liveness: impl Fn(&ProcessId) -> Liveness,
    ) -> bool {
        let Some(slot) = self.processes.get(usize::from(index)) else {
            return true;
        };
        match slot.occupant(index) {
            Some(occupant) if occupant.slot.generation & mask == generation & mask => {
                liveness(&occupant.process) == Liveness::Dead
            }
            // A torn read retried out: look again later.
            None if live_pid(slot.state.load(Ordering::Acquire)).is_some() => false,
            _ => true,
        }
    }
}

/// Frees `slot` if its state is still `from` (a claim or reap that nobody else took over).
fn free_slot(slot: &ProcessSlot, from: u64, generation: u32) -> bool {
    // AcqRel: the Release half orders everything done to the slot (a reclaim) before it can
    // be claimed again (pairs with the Acquire CAS in `claim_slot`).
    slot.state
        .compare_exchange(
            from,
            state_word(generation, PHASE_LIVE, 0),
            Ordering::AcqRel,
            Ordering::Relaxed,
        )
        .is_ok()
}

/// Liveness of a claimant or reaper, known by pid only: it is dead when no process has
/// that pid. (A reused pid keeps the slot waiting until that process exits too.)
fn pid_liveness(pid: u32, liveness: impl Fn(&ProcessId) -> Liveness) -> Liveness {
    match crate::shm::process_start_time(pid) {
        Some(start_time) => liveness(&ProcessId { pid, start_time }),
        None => liveness(&ProcessId { pid, start_time: 0 }),
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn pending_entries_name_their_owner_with_its_generation() {
        let issuer = SlotId {
            index: 3,
            generation: 7,
        };
        let entry = pending::entry(issuer, 2, 1, 0xabcdef);
        assert!(pending::owned_by(entry, issuer));
        assert!(!pending::owned_by(
            entry,
            SlotId {
                index: 3,
                generation: 8
            }
        ));
        assert_eq!((pending::senders(entry), pending::receivers(entry)), (2, 1));
        let redeemer = SlotId {
            index: 9,
            generation: 300,
        };
        let taken = pending::with_owner(entry, redeemer);
        assert!(pending::owned_by(taken, redeemer));
        assert!(!pending::owned_by(taken, issuer));
        assert_eq!((pending::senders(taken), pending::receivers(taken)), (2, 1));
    }

    #[test]
    fn state_words_round_trip() {
        let state = state_word(u32::MAX, PHASE_REAPING, (1 << 30) - 1);
        assert_eq!(generation_of(state), u32::MAX);
        assert_eq!(phase_of(state), PHASE_REAPING);
        assert_eq!(pid_of(state), (1 << 30) - 1);
        assert_eq!(live_pid(state), None);
        assert_eq!(live_pid(state_word(4, PHASE_LIVE, 42)), Some(42));
    }
}
