//! Sleeping on a 32-bit word in shared memory: futex wait/wake, the one primitive every
//! blocking operation is built on.
//!
//! The futexes are *shared* (no `FUTEX_PRIVATE_FLAG`): waiter and waker are different
//! processes that map the same page at different addresses; the kernel keys shared futexes
//! by the backing file page, so that works.
//!
//! Every wait is bounded (at most [`MAX_SLEEP`]) so callers can poll for signals, deadlines
//! and dead peers; a lost wake-up therefore costs latency, never a hang.
//!
//! Under `cfg(loom)` the same functions are stand-ins for the loom models (see below).
use std::time::{Duration, Instant};

use crate::sync::AtomicU32;

/// Longest single sleep: the granularity at which Ctrl-C, deadlines and dead peers are noticed.
pub const MAX_SLEEP: Duration = Duration::from_millis(50);

/// Sleeps while `*word == expected`, for at most `timeout` (capped at [`MAX_SLEEP`]).
/// Returns on wake-up, timeout, signal or a value mismatch alike: callers re-check.
#[cfg(not(loom))]
pub fn futex_wait(word: &AtomicU32, expected: u32, timeout: Duration) {
    futex_wait_address(word.as_ptr() as usize, expected, timeout.min(MAX_SLEEP));
}

/// [`futex_wait`] on a raw address that may no longer be mapped (the kernel then answers
/// EFAULT; nothing is dereferenced here), for at most `timeout` (capped at one second).
/// For waiters that must not hold the memory alive.
#[cfg(not(loom))]
pub fn futex_wait_address(address: usize, expected: u32, timeout: Duration) {
    let timeout = timeout.min(Duration::from_secs(1));
    let spec = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: the kernel validates `address` itself (EFAULT if unmapped) and only reads the
    // 4-byte word; the timespec outlives the call. Errors (EAGAIN on mismatch, EINTR,
    // ETIMEDOUT, EFAULT) all mean "re-check", so the result is ignored on purpose.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            address as *const u32,
            libc::FUTEX_WAIT,
            expected,
            &spec as *const libc::timespec,
        );
    }
}

/// Wakes up to `count` processes sleeping on `word`.
#[cfg(not(loom))]
pub fn futex_wake(word: &AtomicU32, count: i32) {
    // SAFETY: as in `futex_wait`; FUTEX_WAKE does not dereference beyond the word.
    unsafe {
        libc::syscall(libc::SYS_futex, word.as_ptr(), libc::FUTEX_WAKE, count);
    }
}

/// The address the kernel keys a futex on: the word's own, for [`futex_wait_address`].
#[cfg(not(loom))]
pub fn word_address(word: &AtomicU32) -> usize {
    word.as_ptr() as usize
}

// Under loom there is no kernel and no clock. A sleep blocks the modelled thread until a
// wake (so a lost wake-up is a deadlock loom reports, not a 50 ms hiccup) and every wake
// wakes every sleeper (spurious wake-ups are allowed: callers re-check). Timeouts do not
// exist until a model calls `let_sleeps_time_out` (after a holder died): from then on a
// sleep only lets the other threads run and returns, as a sleep that timed out does.
#[cfg(loom)]
mod model {
    use loom::sync::atomic::AtomicBool;
    use loom::sync::{Condvar, Mutex};

    loom::lazy_static! {
        /// The kernel's futex bucket, one for every word: a sleeper checks its word under
        /// the mutex and a wake takes it, so no wake falls between the check and the sleep.
        pub static ref BUCKET: (Mutex<()>, Condvar) = (Mutex::new(()), Condvar::new());
        pub static ref TIMING_OUT: AtomicBool = AtomicBool::new(false);
    }
}

#[cfg(loom)]
pub fn futex_wait(word: &AtomicU32, expected: u32, _timeout: Duration) {
    use crate::sync::Ordering::SeqCst;
    let (mutex, sleepers) = &*model::BUCKET;
    let guard = mutex.lock().unwrap();
    if model::TIMING_OUT.load(SeqCst) {
        drop(guard);
        loom::thread::yield_now();
    } else if word.load(SeqCst) == expected {
        drop(sleepers.wait(guard).unwrap());
    }
}

/// Nothing sleeps on these under loom (only the watcher thread, which no model runs).
#[cfg(loom)]
pub fn futex_wait_address(_address: usize, _expected: u32, _timeout: Duration) {
    loom::thread::yield_now();
}

#[cfg(loom)]
pub fn futex_wake(_word: &AtomicU32, _count: i32) {
    let (mutex, sleepers) = &*model::BUCKET;
    let _guard = mutex.lock().unwrap();
    sleepers.notify_all();
}

/// Under loom: from now on every sleep times out at once (time passes in the model, as it
/// does for a waiter whose lock holder died and will never wake it).
#[cfg(loom)]
pub fn let_sleeps_time_out() {
    let (mutex, sleepers) = &*model::BUCKET;
    let _guard = mutex.lock().unwrap();
    model::TIMING_OUT.store(true, crate::sync::Ordering::SeqCst);
    sleepers.notify_all();
}

/// Under loom only an identity: the address is never handed to a kernel.
#[cfg(loom)]
pub fn word_address(word: &AtomicU32) -> usize {
    std::ptr::from_ref(word) as usize
}

/// When a blocking call must give up. `None` waits forever.
#[derive(Clone, Copy, Debug)]
pub struct Deadline(Option<Instant>);

impl Deadline {
    pub fn after(timeout: Option<Duration>) -> Self {
        Deadline(timeout.map(|t| Instant::now() + t))
    }

    pub fn never() -> Self {
        Deadline(None)
    }

    /// Time left, or `None` when the deadline has passed.
    pub fn remaining(&self) -> Option<Duration> {
        match self.0 {
            None => Some(MAX_SLEEP),
            Some(at) => at
                .checked_duration_since(Instant::now())
                .filter(|d| !d.is_zero()),
        }
    }
}

/// What a blocked operation runs at every wake-up: the binding checks for pending signals
/// (Ctrl-C) here and returns `Err(Error::Interrupted)` to abandon the wait.
pub type Interrupt<'a> = &'a mut dyn FnMut() -> crate::Result<()>;

/// What a call that gives up on a lock because its deadline passed reports: a `put`
/// (`Full`) or a `get` (`Empty`), as if it had waited for room or a message that long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeoutKind {
    Full,
    Empty,
}

thread_local! {
    /// The deadline of the blocking call this thread is in (see [`call_scope`]).
    static CALL: std::cell::Cell<Option<(Instant, TimeoutKind)>> = const { std::cell::Cell::new(None) };
}

/// While the returned guard lives, waits for the channel's locks on this thread give up
/// at `deadline` (a lock held by a live process that does not let go, or a corrupt word,
/// then costs the call its timeout, never a hang). Scopes nest; the innermost wins.
pub fn call_scope(deadline: Deadline, kind: TimeoutKind) -> CallScope {
    let previous = CALL.with(|call| call.replace(deadline.0.map(|at| (at, kind))));
    CallScope { previous }
}

/// The deadline of the current call, if it has one and it has passed: what to report.
pub fn call_expired() -> Option<TimeoutKind> {
    CALL.with(|call| call.get())
        .filter(|(at, _)| Instant::now() >= *at)
        .map(|(_, kind)| kind)
}

/// Restores the enclosing call's deadline when dropped.
pub struct CallScope {
    previous: Option<(Instant, TimeoutKind)>,
}

impl Drop for CallScope {
    fn drop(&mut self) {
        CALL.with(|call| call.set(self.previous));
    }
}
