//! Readiness for waiters that must not block their thread (asyncio): which words of the
//! channel to watch for one side to become ready, and the same lost-wake-up protocol as
//! `Channel::wait_until`, split in steps another thread can finish.
//!
//! The caller that will take the message (or publish) never sleeps itself:
//!
//! 1. [`Readiness::snapshot`] reads the words (SeqCst) *before* the caller's non-blocking
//!    attempt, so any push, pop, free or close after that attempt changes a word;
//! 2. the attempt fails (`Empty`/`Full`);
//! 3. [`Readiness::register`] adds the caller to each word's waiter count (SeqCst) and
//!    re-reads the words: if one moved, it backs out and the caller tries again at once;
//! 4. a helper thread sleeps on the words ([`Readiness::futexes`], `wait::futex_wait_any`)
//!    and tells the caller once [`Readiness::changed`] says one moved; the caller goes back
//!    to 1; [`Readiness::unregister`] when it stops waiting (done, timed out, cancelled).
//!
//! Steps 1 and 3 are `wait_until`'s load of `seen` and its registration + re-check, with the
//! same partners: the SeqCst bump + waiter-count load of `try_push` / `try_pop` /
//! `Slab::notify_space` / `wake_publishers` / `ControlBlock::handles_changed`. Either the
//! waker's load sees our registration and it issues `futex_wake`, or our re-check (or the
//! kernel's comparison in `futex_waitv`) sees its bump. Nothing here takes a message: a
//! waiter that gives up leaves the channel exactly as it was, and one woken for a message
//! another consumer took only tries again.
//!
//! A few wakers wake one sleeper (`try_push`, `try_pop`: `futex_wake(.., 1)`); when that one
//! is a synchronous waiter of this process, the helper sees the change at its next bounded
//! sleep (`wait::MAX_SLEEP`): latency, never a lost message.
use std::sync::Arc;

use super::Channel;
use crate::procs::Side;
use crate::sync::{AtomicU32, Ordering};
use crate::wait::{word_address, FutexTarget};

/// What the waiter waits for: a message to take, or room to put one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// `get` (a channel's receiver, a subscriber, a mailbox reader): woken by pushes and
    /// closes, the words `receive`, `receive_subscriber` and `receive_latest` sleep on.
    Receive,
    /// `put` (a channel's sender, a publisher): woken by pops (room in the ring), frees
    /// (room in the slab) and closes, the words `publish`, `publish_shared` and
    /// `allocate` sleep on.
    Send,
}

/// A word of the control block and the waiter count its wakers look at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WakeWord {
    Pushed,
    Popped,
    Freed,
}

const RECEIVE: &[WakeWord] = &[WakeWord::Pushed];
const SEND: &[WakeWord] = &[WakeWord::Popped, WakeWord::Freed];

impl Direction {
    pub fn of(side: Side) -> Direction {
        match side {
            Side::Sender => Direction::Send,
            Side::Receiver => Direction::Receive,
        }
    }
}

/// The words one side of a channel becomes ready on, and their values at the last
/// [`snapshot`](Readiness::snapshot). Holds the channel, so the words stay mapped.
#[derive(Clone)]
pub struct Readiness {
    channel: Arc<Channel>,
    /// Every word of the direction (read by `snapshot`)...
    all: &'static [WakeWord],
    /// ...and those the last `register` chose to wait on (see there).
    words: &'static [WakeWord],
    seen: [u32; 2],
}

impl Readiness {
    pub fn new(channel: Arc<Channel>, direction: Direction) -> Readiness {
        let words = match direction {
            Direction::Receive => RECEIVE,
            Direction::Send => SEND,
        };
        let mut readiness = Readiness {
            channel,
            all: words,
            words,
            seen: [0; 2],
        };
        readiness.snapshot();
        readiness
    }

    fn word(&self, word: WakeWord) -> (&AtomicU32, &AtomicU32) {
        let control = self.channel.control();
        match word {
            WakeWord::Pushed => (&control.ring.pushed, &control.ring.consumers_waiting),
            WakeWord::Popped => (&control.ring.popped, &control.ring.producers_waiting),
            WakeWord::Freed => (&control.heap.freed, &control.heap.space_waiters),
        }
    }

    /// Step 1: reads every word, before the caller's non-blocking attempt.
    pub fn snapshot(&mut self) {
        self.words = self.all;
        for (index, &word) in self.all.iter().enumerate() {
            // SeqCst: as `wait_until`'s load of `seen`; any bump after this load is seen
            // by `changed` (same word, coherence).
            self.seen[index] = self.word(word).0.load(Ordering::SeqCst);
        }
    }

    /// True when a word moved since the snapshot: the side may be ready, try again.
    pub fn changed(&self) -> bool {
        self.words.iter().zip(self.seen).any(|(&word, seen)| {
            // SeqCst: the re-check of `wait_until`, after the registration in `register`.
            self.word(word).0.load(Ordering::SeqCst) != seen
        })
    }

    /// Step 3: counts the caller as a waiter on each word, then re-checks them. True when
    /// it is now registered and may sleep (until [`unregister`](Readiness::unregister));
    /// false (and not registered) when a word moved already.
    ///
    /// A sender facing a full ring waits for a pop alone: no put can succeed before one,
    /// and a failed publish of a fan-out channel frees the block it allocated, which moves
    /// `freed` itself (waiting on `freed` too would make every wait end at once). With room
    /// in the ring, the put failed for memory (or a pop came since): both words.
    pub fn register(&mut self) -> bool {
        if self.all == SEND && self.channel.ring().is_full() {
            self.words = &SEND[..1];
        }
        for &word in self.words {
            // SeqCst: pairs with the waker's SeqCst bump + load of this count (see the
            // module docs): it sees us, or the re-check below sees its bump.
            self.word(word).1.fetch_add(1, Ordering::SeqCst);
        }
        if self.changed() {
            self.unregister();
            return false;
        }
        true
    }

    /// Takes back a [`register`](Readiness::register). Only in the process that
    /// registered: the counts are shared.
    pub fn unregister(&self) {
        for &word in self.words {
            let _ = self
                .word(word)
                .1
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    Some(n.saturating_sub(1))
                });
        }
    }

    /// The words to sleep on (shared futexes), with the values of the snapshot.
    pub fn futexes(&self) -> impl Iterator<Item = FutexTarget> + '_ {
        self.words
            .iter()
            .zip(self.seen)
            .map(|(&word, expected)| FutexTarget {
                address: word_address(self.word(word).0),
                expected,
                private: false,
            })
    }

    pub fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }
}

impl Channel {
    /// `receive_latest` without waiting: the newest version once it is newer than
    /// `newer_than`, `None` while there is none, the side's `Closed`/`PeerGone` once every
    /// writer is gone and nothing newer is left.
    pub fn poll_latest(&self, newer_than: u64) -> crate::Result<Option<(u64, super::Received)>> {
        self.run_deferred();
        if let Some(taken) = self.try_take_latest(newer_than)? {
            return Ok(Some(taken));
        }
        if !self.any_open(Side::Sender) {
            return self
                .try_take_latest(newer_than)?
                .map(Some)
                .ok_or_else(|| self.side_gone(Side::Sender));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::channel::ChannelOptions;
    use crate::wait::{futex_wait_any, Deadline};
    use std::time::Duration;

    fn channel(capacity: usize) -> Arc<Channel> {
        let channel = Channel::create(&ChannelOptions {
            capacity,
            slab_bytes: Some(1 << 20),
            max_slab_bytes: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        channel.open_handle(Side::Sender);
        channel.open_handle(Side::Receiver);
        channel
    }

    fn send(channel: &Channel) -> crate::Result<()> {
        let deadline = Deadline::after(Some(Duration::ZERO));
        let allocation = channel.begin_put(8, false, deadline, &mut || Ok(()))?;
        channel
            .publish(&allocation, &[], false, deadline, &mut || Ok(()))
            .inspect_err(|_| channel.abort_put(&allocation))
    }

    fn take(channel: &Channel) -> crate::Result<()> {
        let received = channel.receive(false, Deadline::never(), &mut || Ok(()))?;
        channel.release_message(received.block);
        Ok(())
    }

    #[test]
    fn a_registered_receiver_is_counted_and_sees_the_next_push() {
        let channel = channel(4);
        let waiters = &channel.control().ring.consumers_waiting;
        let mut readiness = Readiness::new(channel.clone(), Direction::Receive);
        assert!(readiness.register());
        // Counted: the pusher's load of the count sees us and issues the wake.
        assert_eq!(waiters.load(Ordering::SeqCst), 1);
        assert!(!readiness.changed());
        send(&channel).unwrap();
        assert!(readiness.changed());
        readiness.unregister();
        assert_eq!(waiters.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_push_between_the_attempt_and_the_registration_is_not_slept_through() {
        let channel = channel(4);
        let mut readiness = Readiness::new(channel.clone(), Direction::Receive);
        assert!(take(&channel).is_err()); // the failed attempt
        send(&channel).unwrap(); // lands before `register`
        assert!(!readiness.register());
        assert_eq!(
            channel
                .control()
                .ring
                .consumers_waiting
                .load(Ordering::SeqCst),
            0
        );
        take(&channel).unwrap();
    }

    #[test]
    fn a_sender_on_a_full_ring_sees_the_pop_and_the_close() {
        let channel = channel(1);
        send(&channel).unwrap();
        let mut readiness = Readiness::new(channel.clone(), Direction::Send);
        assert!(matches!(send(&channel), Err(crate::Error::Full(_))));
        assert!(readiness.register());
        assert_eq!(
            channel
                .control()
                .ring
                .producers_waiting
                .load(Ordering::SeqCst),
            1
        );
        // A full ring: only a pop can make room, so only pops are waited for.
        assert_eq!(
            channel.control().heap.space_waiters.load(Ordering::SeqCst),
            0
        );
        take(&channel).unwrap();
        assert!(readiness.changed());
        readiness.unregister();
        send(&channel).unwrap();

        readiness.snapshot();
        assert!(readiness.register());
        channel.close_handle(Side::Receiver);
        assert!(
            readiness.changed(),
            "a close moves the words senders wait on"
        );
        readiness.unregister();
        assert!(matches!(send(&channel), Err(crate::Error::Closed(_))));
    }

    #[test]
    fn a_sender_short_of_memory_waits_for_a_free() {
        let channel = channel(4); // a 1 MiB slab, the most it may map
        let deadline = Deadline::after(Some(Duration::ZERO));
        let first = channel
            .begin_put(600 << 10, false, deadline, &mut || Ok(()))
            .unwrap();
        channel
            .publish(&first, &[], false, deadline, &mut || Ok(()))
            .unwrap();
        let mut readiness = Readiness::new(channel.clone(), Direction::Send);
        let refused = channel.begin_put(600 << 10, false, deadline, &mut || Ok(()));
        assert!(matches!(refused, Err(crate::Error::Full(_))));
        assert!(readiness.register());
        assert_eq!(
            channel.control().heap.space_waiters.load(Ordering::SeqCst),
            1
        );
        take(&channel).unwrap();
        assert!(readiness.changed(), "the free ends the wait");
        readiness.unregister();
        assert_eq!(
            channel.control().heap.space_waiters.load(Ordering::SeqCst),
            0
        );
    }

    #[test]
    fn the_helper_sleep_returns_when_a_watched_word_moves() {
        let channel = channel(4);
        let mut readiness = Readiness::new(channel.clone(), Direction::Receive);
        assert!(readiness.register());
        let sleeper = {
            let readiness = readiness.clone();
            std::thread::spawn(move || {
                let targets: Vec<_> = readiness.futexes().collect();
                // Bounded sleeps, as the helper's: it must end with the change seen.
                for _ in 0..200 {
                    if readiness.changed() {
                        return true;
                    }
                    futex_wait_any(&targets, Duration::from_millis(50));
                }
                false
            })
        };
        send(&channel).unwrap();
        assert!(sleeper.join().unwrap());
        readiness.unregister();
    }

    #[test]
    fn a_failed_publish_on_a_full_broadcast_ring_does_not_end_its_own_wait() {
        // The failed publish frees the block it allocated (moving `freed`): the wait must
        // be for the subscriber's read, not end at once (a busy loop in the event loop).
        let channel = Channel::create(&ChannelOptions {
            capacity: 1,
            kind: crate::channel::Kind::Broadcast { drop_oldest: false },
            slab_bytes: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        channel.open_handle(Side::Sender);
        let subscriber = channel.subscribe().unwrap();
        channel.open_handle(Side::Receiver);
        let publish = || -> crate::Result<u64> {
            let deadline = Deadline::after(Some(Duration::ZERO));
            let allocation = channel.begin_publish(8, false, deadline, &mut || Ok(()))?;
            channel
                .publish_shared(&allocation, false, deadline, &mut || Ok(()))
                .inspect_err(|_| channel.abort_put(&allocation))
        };
        publish().unwrap();
        let mut readiness = Readiness::new(channel.clone(), Direction::Send);
        assert!(matches!(publish(), Err(crate::Error::Full(_))));
        assert!(
            readiness.register(),
            "the failed publish's own free ended the wait"
        );
        let received = channel
            .receive_subscriber(subscriber, false, Deadline::never(), &mut || Ok(()))
            .unwrap();
        channel.release_message(received.block);
        assert!(
            readiness.changed(),
            "the read that retires the message ends the wait"
        );
        readiness.unregister();
        publish().unwrap();
        channel.close_subscriber(subscriber);
    }

    #[test]
    fn poll_latest_never_waits_and_reports_closed() {
        let channel = Channel::create(&ChannelOptions {
            kind: crate::channel::Kind::Latest,
            slab_bytes: Some(1 << 20),
            ..Default::default()
        })
        .unwrap();
        channel.open_handle(Side::Sender);
        channel.open_handle(Side::Receiver);
        assert!(channel.poll_latest(0).unwrap().is_none());
        channel.close_handle(Side::Sender);
        assert!(matches!(
            channel.poll_latest(0),
            Err(crate::Error::Closed(_))
        ));
    }
}
