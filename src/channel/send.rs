//! Sending: allocating a block (waiting for memory), publishing it on the ring (waiting
//! for room), and the `alloc` buffers that messages reference.
use std::time::{Duration, Instant};

use super::*;

impl Channel {
    pub(super) fn ensure_receivers(&self) -> Result<()> {
        if !self.any_open(Side::Receiver) {
            return Err(self.side_gone(Side::Receiver));
        }
        Ok(())
    }

    /// Allocates a block for a frame of `len` bytes, waiting for memory while `deadline`
    /// allows. `block == false` fails at once instead of waiting.
    pub fn begin_put(
        &self,
        len: usize,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Allocation> {
        let _scope = call_scope(deadline, TimeoutKind::Full);
        self.run_deferred();
        self.ensure_receivers()?;
        if !block && self.ring().is_full() {
            return Err(self.ring_full_error());
        }
        self.allocate(len, OWNER_SENDER, block, deadline, interrupt)
    }

    /// A buffer for `Sender.alloc`: a block the caller fills in place.
    pub fn allocate_buffer(
        &self,
        len: usize,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Allocation> {
        let _scope = call_scope(deadline, TimeoutKind::Full);
        self.allocate(len, OWNER_ALLOC, true, deadline, interrupt)
    }

    pub(super) fn allocate(
        &self,
        len: usize,
        kind: u64,
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<Allocation> {
        let owner = owner_word(kind, self.slab.slot_id());
        let allocation = match self.slab.allocate(len, owner)? {
            Some(allocation) => allocation,
            None if !block => return Err(self.slab_full_error(len)),
            None => {
                let heap = &self.control().heap;
                let result = self.wait_until(
                    &heap.freed,
                    &heap.space_waiters,
                    deadline,
                    interrupt,
                    || {
                        self.ensure_receivers()?;
                        self.slab.allocate(len, owner)
                    },
                )?;
                result.ok_or_else(|| self.slab_full_error(len))?
            }
        };
        if let Err(error) = self.wait_until_held_elsewhere(allocation.block.segment(), interrupt) {
            match kind {
                // `alloc` buffers are never allocated in a quick scope.
                OWNER_ALLOC => drop(self.slab.drop_creator(allocation.block)),
                _ => self.abandon(allocation.block),
            }
            return Err(error);
        }
        crate::failpoint!("put.allocated");
        Ok(allocation)
    }

    /// Waits (briefly, once per new segment) until another live process maps segment
    /// `index`, so what we publish in it survives if we die. Peers' watchers map a new
    /// segment within microseconds to milliseconds; one that never does (stopped with
    /// SIGSTOP) delays us by at most `HELD_ELSEWHERE_WAIT`, after which we go on.
    pub(super) fn wait_until_held_elsewhere(
        &self,
        index: usize,
        interrupt: Interrupt,
    ) -> Result<()> {
        let held = &self.held_elsewhere[index];
        if held.load(Ordering::Relaxed) {
            return Ok(());
        }
        if crate::wait::is_quick() {
            // Checked (and waited for) once per segment, by the normal retry.
            return Err(Error::WouldBlock);
        }
        let started = Instant::now();
        while !self.slab.held_elsewhere(index) && self.slab.has_peers() {
            if started.elapsed() > HELD_ELSEWHERE_WAIT {
                return Ok(());
            }
            interrupt()?;
            std::thread::sleep(Duration::from_micros(200));
        }
        held.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Publishes a filled block whose frame references the `alloc` blocks `buffers` (in
    /// the frame's order); waits for room in the ring while `deadline` allows. On error the
    /// block is still the caller's (release it with `abort_put`, which also drops the
    /// references counted here).
    pub fn publish(
        &self,
        allocation: &Allocation,
        buffers: &[SlabRef],
        block: bool,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<()> {
        let _scope = call_scope(deadline, TimeoutKind::Full);
        let me = self.slab.slot_id();
        let entry = Entry {
            block: allocation.block.0,
            origin: u32::from(me.index),
        };
        let queued = owner_word(OWNER_QUEUED, me);
        if buffers.is_empty() {
            // No references to count: the owner word alone makes the message complete.
            self.slab
                .header(allocation.block)?
                .owner
                .store(queued, Ordering::Relaxed);
        } else {
            self.slab
                .commit_message(allocation.block, buffers, queued)?;
        }
        crate::failpoint!("publish.before_push");
        // Counted before the push: a fast receiver may release it before we return.
        let slot = &self.control().processes[usize::from(me.index)];
        slot.outstanding.fetch_add(1, Ordering::Relaxed);
        let origin = origin_word(me);
        let pushed = (|| {
            Ok(self.try_push(entry)?
                || (block && self.spin_until_pushed(entry, deadline, &mut *interrupt)?))
        })()
        .inspect_err(|_: &Error| self.uncount_outstanding(origin))?;
        let pushed = if pushed {
            true
        } else if block {
            let ring_state = &self.control().ring;
            self.wait_until(
                &ring_state.popped,
                &ring_state.producers_waiting,
                deadline,
                interrupt,
                || {
                    self.ensure_receivers()?;
                    Ok(self.try_push(entry)?.then_some(()))
                },
            )
            .inspect_err(|_| self.uncount_outstanding(origin))?
            .is_some()
        } else {
            false
        };
        if !pushed {
            self.uncount_outstanding(origin);
            return Err(self.ring_full_error());
        }
        crate::failpoint!("publish.after_push");
        Ok(())
    }

    /// Spins for up to the channel's spin time (`spin_us=`, 20 µs by default) while `ready`
    /// says nothing can be done, trying `attempt` when it says something can. Sleeping and
    /// being woken costs tens of microseconds on a virtual machine (a futex round trip),
    /// far more than the next pop or push of a peer that is keeping up, so a short spin
    /// first saves both sides the system calls. The spin ends at the call's `deadline`, and
    /// a long one (`spin_us=` allows a second) runs `interrupt` every `wait::MAX_SLEEP`, as
    /// a sleep would.
    ///
    /// No spin when another process already sleeps for the same thing (`waiting`, the
    /// count of the word the caller would sleep on, when only one of them can be served:
    /// not for broadcast subscribers): it got there first and will be served first, and
    /// with more processes than cores (DataLoader workers, RL actors) a spinning producer
    /// takes the processor the consumer needs to make room.
    pub(super) fn spin<T>(
        &self,
        waiting: Option<&AtomicU32>,
        deadline: Deadline,
        interrupt: Interrupt,
        ready: impl Fn(&Ring<'_>) -> bool,
        mut attempt: impl FnMut() -> Result<Option<T>>,
    ) -> Result<Option<T>> {
        // Relaxed: a hint only; a stale count costs one spin or one sleep too many.
        if self.spin.is_zero() || waiting.is_some_and(|count| count.load(Ordering::Relaxed) > 0) {
            return Ok(None);
        }
        let started = Instant::now();
        let mut spin_until = started + self.spin;
        if let Some(at) = deadline.instant() {
            spin_until = spin_until.min(at);
        }
        let mut next_check = started + crate::wait::MAX_SLEEP;
        let ring = self.ring();
        loop {
            let now = Instant::now();
            if now >= spin_until {
                return Ok(None);
            }
            if now >= next_check {
                interrupt()?;
                next_check = now + crate::wait::MAX_SLEEP;
            }
            if ready(&ring) {
                if let Some(value) = attempt()? {
                    return Ok(Some(value));
                }
            }
            std::hint::spin_loop();
        }
    }

    /// A full ring: spin briefly for a consumer to make room (see `spin`).
    pub(super) fn spin_until_pushed(
        &self,
        entry: Entry,
        deadline: Deadline,
        interrupt: Interrupt,
    ) -> Result<bool> {
        Ok(self
            .spin(
                Some(&self.control().ring.producers_waiting),
                deadline,
                interrupt,
                |ring| !ring.is_full(),
                || Ok(self.try_push(entry)?.then_some(())),
            )?
            .is_some())
    }

    pub(super) fn try_push(&self, entry: Entry) -> Result<bool> {
        let control = self.control();
        let pushed = {
            let _guard = self.slab.lock(&control.ring_lock)?;
            self.ring().push(entry)
        };
        if pushed {
            // SeqCst: pairs with the SeqCst waiter registration in `wait_until`.
            control.ring.pushed.fetch_add(1, Ordering::SeqCst);
            if control.ring.consumers_waiting.load(Ordering::SeqCst) > 0 {
                futex_wake(&control.ring.pushed, 1);
            }
        }
        Ok(pushed)
    }

    /// Gives back a block whose put failed (and the references `publish` counted for it).
    pub fn abort_put(&self, allocation: &Allocation) {
        self.abandon(allocation.block);
    }

    /// Frees the block of a put that did not happen; no acknowledgement is counted for it.
    /// A quick call holds the GIL and must not wait for another process's heap lock (a
    /// stopped holder would freeze every thread of this one): when the lock is taken the
    /// free is deferred (see `receive::Deferred`), and the block stays this process's
    /// until then.
    fn abandon(&self, block: SlabRef) {
        if !crate::wait::is_quick() {
            let _ = self.slab.free_message(block);
            return;
        }
        if let Ok(None) = self.slab.try_free_message(block) {
            self.defer(receive::Deferred::Abandoned(block));
        }
    }
}
