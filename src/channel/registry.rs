//! The channels this process is attached to, and what happens to them across `fork`.
//!
//! A fork child inherits handles and mappings but is a new process: it registers in a slot
//! of its own. Which inherited handles count as open there depends on how it was forked:
//!
//! - by `multiprocessing` (the binding finds the `Process` being started): only the handles
//!   handed to that process (its arguments and attributes) count at once; any other
//!   inherited handle counts from its first use. Otherwise sibling children would each keep
//!   the others waiting through copies of the parent's handles they never touch.
//! - by a bare `os.fork()`: every inherited handle counts, as inherited pipe ends do.
//!
//! Between the fork and the child's registration the parent may close its copies (the
//! usual pattern right after `Process.start()`), so the parent first records the handles
//! the child inherits as *pending* (keeping the channel open), and the child redeems that
//! entry once it has counted its own.
//!
//! The registry lock is held across the fork (taken in `before_fork`, released in the
//! after-fork hooks), so the child never inherits it locked by another thread.
use std::cell::RefCell;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use super::{random_u64, side_index, Channel};
use crate::procs::Side;
use crate::shm::{current_pid, ProcessId};
use crate::sync::Ordering;

type Entries = Vec<(u64, Weak<Channel>)>;
/// What `before_fork` holds until the after-fork hooks: the registry lock and the channels.
type Held = (MutexGuard<'static, Entries>, Vec<Arc<Channel>>);

static REGISTRY: Mutex<Entries> = Mutex::new(Vec::new());

thread_local! {
    /// The registry guard and the channels pinned for the duration of a fork.
    static HELD: RefCell<Option<Held>> =
        const { RefCell::new(None) };
}

fn lock() -> MutexGuard<'static, Entries> {
    REGISTRY.lock().unwrap_or_else(|poison| poison.into_inner())
}

pub(super) fn find(id: u64) -> Option<Arc<Channel>> {
    let found = lock()
        .iter()
        .find(|(key, _)| *key == id)
        .and_then(|(_, weak)| weak.upgrade());
    found.filter(|channel| channel.owned_here())
}

pub(super) fn insert(channel: &Arc<Channel>) {
    let mut entries = lock();
    entries.retain(|(_, weak)| weak.strong_count() > 0);
    entries.push((channel.id, Arc::downgrade(channel)));
}

pub(super) fn remove(id: u64) {
    // try_lock: a Channel dropped while the fork hooks hold the lock is cleaned up by the
    // next `insert` instead.
    if let Ok(mut entries) = REGISTRY.try_lock() {
        entries.retain(|(key, weak)| *key != id || weak.strong_count() > 0);
    }
}

/// Run in the parent just before `fork()`.
pub fn before_fork() {
    let guard = lock();
    let channels: Vec<Arc<Channel>> = guard
        .iter()
        .filter_map(|(_, weak)| weak.upgrade())
        .collect();
    for channel in &channels {
        if !channel.owned_here() {
            continue;
        }
        let senders = channel.local[side_index(Side::Sender)]
            .load(Ordering::Relaxed)
            .min(255) as u8;
        let receivers = channel.local[side_index(Side::Receiver)]
            .load(Ordering::Relaxed)
            .min(255) as u8;
        if channel.kind().fans_out() {
            channel.pin_for_fork();
        }
        if senders == 0 && receivers == 0 {
            continue;
        }
        // If the table is full the child still registers; only the close-before-register
        // race stays open then.
        let entry = channel.control().add_pending(
            channel.slab.slot_id(),
            senders,
            receivers,
            random_u64() as u32,
        );
        channel
            .fork_pending
            .store(entry.unwrap_or(0), Ordering::Relaxed);
    }
    HELD.with(|held| *held.borrow_mut() = Some((guard, channels)));
}

/// Run in the parent after `fork()`: the child redeems the pending entries.
pub fn after_fork_in_parent() {
    let taken = HELD.with(|held| held.borrow_mut().take());
    if let Some((guard, channels)) = taken {
        for channel in &channels {
            channel.fork_pending.store(0, Ordering::Relaxed);
            channel.forget_fork_pins();
        }
        drop(guard);
    }
}

/// Run in the child after `fork()`: registers this process in every inherited channel.
/// `count_inherited`: count every inherited handle now (a bare fork); otherwise none, and
/// `adopt` counts the handles handed to the new process. Pending entries are redeemed only
/// after that: the parent may already have closed its copies, and redeeming first would
/// let the count reach zero and end the channel under the child's feet.
pub fn after_fork_in_child(count_inherited: bool, adopt: impl FnOnce()) {
    let taken = HELD.with(|held| held.borrow_mut().take());
    let Some((guard, channels)) = taken else {
        return;
    };
    let me = ProcessId::current();
    // Per channel (in order): the pins of the subscribers inherited, redeemed once the
    // handles handed to this child hold them.
    let mut fork_pins: Vec<Vec<(u64, crate::channel::SubscriberId)>> = vec![];
    for channel in &channels {
        // A child that cannot read its own start time cannot claim a slot honestly: its
        // inherited handles stay unusable here (as when the table is full).
        let Ok(me) = me else {
            channel.pid.store(0, Ordering::Relaxed);
            continue;
        };
        let control = channel.control();
        let control_fd = channel.slab.control_segment().raw_fd();
        match control.claim_slot(me, control_fd) {
            Ok(slot) => {
                let pending = channel.fork_pending.load(Ordering::Relaxed);
                if pending != 0 {
                    // Answerable for it now: if this child dies before redeeming it, its
                    // reaper drops it (the parent may live on).
                    control.adopt_pending(pending, slot);
                }
                channel.slab.after_fork_in_child();
                // The parent's deferred releases are the parent's to run.
                if let Ok(mut list) = channel.deferred.try_lock() {
                    list.clear();
                }
                let pins = channel.forget_holds();
                for &(pin, _) in &pins {
                    control.adopt_pending(pin, slot);
                }
                fork_pins.push(pins);
                channel.slab.set_slot(slot);
                channel.slab.publish_mapped_segments();
                channel.pid.store(current_pid(), Ordering::Relaxed);
                channel
                    .counts_inherited
                    .store(count_inherited, Ordering::Relaxed);
                super::watcher::start(channel);
                for side in [Side::Sender, Side::Receiver] {
                    let local = &channel.local[side_index(side)];
                    if count_inherited {
                        control.add_handles(slot.index, side, local.load(Ordering::Relaxed));
                    } else {
                        local.store(0, Ordering::Relaxed);
                    }
                }
            }
            // No slot: the inherited handles stay unusable here (owned_here() is false).
            Err(_) => {
                channel.pid.store(0, Ordering::Relaxed);
                fork_pins.push(vec![]);
            }
        }
    }
    adopt();
    for (channel, pins) in channels.iter().zip(&fork_pins) {
        for &(pin, subscriber) in pins {
            // After a bare fork every inherited handle counts here, its subscriber too
            // (a handed one was opened by `adopt` above).
            if count_inherited && channel.owned_here() {
                let _ = channel.open_subscriber(subscriber);
            }
            if channel.owned_here() {
                channel
                    .control()
                    .redeem_pending(pin, channel.slab.slot_id(), || {});
            } else {
                channel.control().withdraw_pending(pin);
            }
        }
    }
    for channel in &channels {
        let pending = channel.fork_pending.swap(0, Ordering::Relaxed);
        if pending == 0 {
            continue;
        }
        if channel.owned_here() {
            // This process's own handles were counted above (or by `adopt`).
            channel
                .control()
                .redeem_pending(pending, channel.slab.slot_id(), || {});
        } else {
            // No slot here: the inherited handles are unusable, so they count nowhere.
            channel.control().withdraw_pending(pending);
        }
    }
    drop(guard);
}
