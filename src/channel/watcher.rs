//! One thread per process and channel that keeps this process's view of the channel fresh
//! while its owner is busy elsewhere (computing, sleeping, or not calling tensorslab):
//!
//! - it maps every new slab segment as soon as one appears, so a segment survives the
//!   process that created it: a memfd lives only while some process holds it, and a
//!   producer killed right after growing the slab would otherwise take the messages in the
//!   new segment with it;
//! - it notices peers that died and reclaims what they held, so memory comes back even
//!   when nobody is blocked in a call;
//! - it runs the releases this process deferred because the heap lock was taken.
//!
//! It sleeps on the slab's segment count (woken by `Slab::grow`). How long depends on
//! whether it has anything periodic to do: the watcher of the process that claimed the
//! current sweep for dead peers (by the watcher or by a blocked call; see "Sharing the
//! sweep" in `recovery.rs`) comes back when the next sweep is due, however early it was
//! woken, and one with deferred releases waiting comes back in 100 ms; every other
//! watcher is a stand-in that looks only once per [`STANDBY`], so n idle processes cost
//! about n + 10 wake-ups a second between them, not 10·n, and one sweep per interval, not
//! n. It holds only a weak reference, so it never keeps a channel alive; it ends within one
//! sleep of the channel's last handle and view in this process. A fork child starts its
//! own (threads do not survive fork).
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::{Channel, REAP_INTERVAL};

/// How long a watcher with nothing periodic to do sleeps: how soon a stand-in takes the
/// sweeps over when no process sweeps any more (the sweeper closed the channel, or died
/// with nobody blocked in a call, who would have taken over within an interval).
const STANDBY: Duration = Duration::from_secs(1);

pub fn start(channel: &Arc<Channel>) {
    let weak = Arc::downgrade(channel);
    // A failed spawn (thread limit) only loses the eagerness; every call still attaches
    // and reaps on demand.
    let _ = std::thread::Builder::new()
        .name("tensorslab-watch".into())
        .stack_size(64 << 10)
        .spawn(move || watch(weak));
}

fn watch(weak: Weak<Channel>) {
    let pid = match weak.upgrade() {
        Some(channel) => channel.pid(),
        None => return,
    };
    loop {
        let (word, seen, sleep) = {
            let Some(channel) = weak.upgrade() else {
                return;
            };
            if channel.pid() != pid {
                return; // a fork child copied this attachment: its own watcher runs there
            }
            let sleep = look(&channel);
            let count = &channel.control().heap.segment_count;
            (
                crate::wait::word_address(count),
                count.load(crate::sync::Ordering::Acquire),
                sleep,
            )
        };
        // The channel (and its mapping) may be dropped while we sleep, so the futex gets
        // the address only, never a reference: FUTEX_WAIT on an address that is no longer
        // mapped fails with EFAULT, and we loop and find the channel gone.
        crate::wait::futex_wait_address(word, seen, sleep);
    }
}

/// One round of the watcher's work; returns how long to sleep before the next.
fn look(channel: &Channel) -> Duration {
    let _ = channel.slab().attach_all();
    channel.run_deferred();
    let _ = channel.reap_if_due();
    // The sweeper is the process that claimed the current sweep, by this thread or by a
    // blocked call: woken early (every growth wakes every watcher), or after a blocked call
    // claimed, it still comes back when the sweep is due, not a standby later.
    match channel.own_sweep_due_in() {
        Some(left) => left.clamp(Duration::from_millis(1), REAP_INTERVAL),
        None if has_deferred(channel) => REAP_INTERVAL,
        None => STANDBY,
    }
}

/// Releases left for the next run (their locks were still taken).
fn has_deferred(channel: &Channel) -> bool {
    let plain = channel
        .deferred
        .lock()
        .map_or(true, |deferred| !deferred.is_empty());
    plain || (channel.kind().fans_out() && channel.has_fan_out_deferred())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::{ChannelOptions, Side};

    #[test]
    fn the_sweeper_woken_early_comes_back_when_the_sweep_is_due() {
        // Every slab growth wakes every watcher of the channel (they sleep on the segment
        // count) before the next sweep is due: the watcher that claimed the sweep must
        // stay the sweeper. It became a stand-in, so after each growth no process swept
        // for a second (a dead peer went unnoticed that long, not ~100 ms).
        let channel = Channel::create(&ChannelOptions::default()).unwrap();
        channel.open_handle(Side::Sender);
        // The sweep is due at creation: this claims it (or this process's watcher just
        // did); either way this process holds the current claim.
        let _ = look(&channel);
        // Woken again at once, as by a growth: not due yet.
        let sleep = look(&channel);
        assert!(
            sleep <= REAP_INTERVAL,
            "the sweeper went on standby for {sleep:?}"
        );
    }
}
