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

    /// The instant itself; `None` for a deadline that never comes.
    pub fn instant(&self) -> Option<Instant> {
        self.0
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

thread_local! {
    /// Whether this thread is in a quick scope (see [`quick_scope`]).
    static QUICK: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, channel operations on this thread do not wait for
/// other processes: a lock that a short spin does not get, a slab that would have to grow,
/// a segment not mapped yet when the call starts or a peer that would have to be waited
/// for makes the call fail with `Error::WouldBlock` instead. Nothing it did stays done: a
/// put that gave up frees its block, or, when the heap lock is taken, defers the free (see
/// `Channel::abort_put`); a get pops nothing. (A segment that appears while the call runs
/// is still mapped by it, as a normal call does: rare, and not a wait for a peer.) The
/// binding makes its first attempt at a `put` or `get` this way with the GIL held (so a
/// call that does not need to wait never gives the GIL up and never waits to take it
/// back), and retries without the GIL only when that fails. `quick_scope(false)` inside
/// one restores normal waiting. Scopes nest; the innermost wins.
pub fn quick_scope(quick: bool) -> QuickScope {
    QuickScope {
        previous: QUICK.with(|cell| cell.replace(quick)),
    }
}

/// True inside a [`quick_scope`].
pub fn is_quick() -> bool {
    QUICK.with(|cell| cell.get())
}

/// Restores the enclosing quick setting when dropped.
pub struct QuickScope {
    previous: bool,
}

impl Drop for QuickScope {
    fn drop(&mut self) {
        QUICK.with(|cell| cell.set(self.previous));
    }
}

/// One word of a [`futex_wait_any`]: sleep while the word at `address` holds `expected`.
/// `private`: the word lives in this process's own memory (no shared-futex lookup).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FutexTarget {
    pub address: usize,
    pub expected: u32,
    pub private: bool,
}

/// Most words one `futex_waitv` call takes (the kernel's `FUTEX_WAITV_MAX`).
pub const WAITV_MAX: usize = 128;

/// How long the fallback for kernels without `futex_waitv` (before 5.16) sleeps on one of
/// the words before looking at all of them again.
pub const WAITV_FALLBACK_SLEEP: Duration = Duration::from_millis(2);

/// The kernel's `struct futex_waitv` (include/uapi/linux/futex.h).
#[cfg(not(loom))]
#[repr(C)]
struct FutexWaitv {
    val: u64,
    uaddr: u64,
    flags: u32,
    reserved: u32,
}

#[cfg(not(loom))]
const FUTEX2_SIZE_U32: u32 = 0x02;
#[cfg(not(loom))]
const FUTEX2_PRIVATE: u32 = 128;

/// Set once `futex_waitv` answered ENOSYS (or `TENSORSLAB_NO_FUTEX_WAITV` is set, to test
/// the fallback): from then on [`futex_wait_any`] waits on one word at a time.
#[cfg(not(loom))]
static WAITV_MISSING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Sleeps until any of `targets` is woken or no longer holds its expected value, for at
/// most `timeout` (capped at one second). Returns on wake-up, timeout, signal, mismatch or
/// an unmapped address (EFAULT) alike: callers re-check every word. Past [`WAITV_MAX`]
/// words, only the first ones are slept on (the others are seen at the timeout). Without
/// `futex_waitv` in the kernel it sleeps on the first word, for at most
/// [`WAITV_FALLBACK_SLEEP`] when there are others (a change of one of them costs that much
/// latency).
#[cfg(not(loom))]
pub fn futex_wait_any(targets: &[FutexTarget], timeout: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let timeout = timeout.min(Duration::from_secs(1));
    let Some(first) = targets.first() else {
        std::thread::sleep(timeout);
        return;
    };
    if !WAITV_MISSING.load(Relaxed) {
        if std::env::var_os("TENSORSLAB_NO_FUTEX_WAITV").is_some() {
            WAITV_MISSING.store(true, Relaxed);
        } else if waitv(&targets[..targets.len().min(WAITV_MAX)], timeout) {
            return;
        }
    }
    // One word only: nothing else to look at, sleep on it as long as asked.
    let timeout = match targets.len() {
        1 => timeout,
        _ => timeout.min(WAITV_FALLBACK_SLEEP),
    };
    if first.private {
        let spec = timespec(timeout);
        // SAFETY: as in `futex_wait_address`; the private futex of a word in this
        // process's memory, kept alive by the caller.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                first.address as *const u32,
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                first.expected,
                &spec as *const libc::timespec,
            );
        }
    } else {
        futex_wait_address(first.address, first.expected, timeout);
    }
}

#[cfg(not(loom))]
fn timespec(timeout: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    }
}

/// One `futex_waitv` call; false if the kernel does not have it (ENOSYS, remembered).
#[cfg(not(loom))]
fn waitv(targets: &[FutexTarget], timeout: Duration) -> bool {
    let waiters: Vec<FutexWaitv> = targets
        .iter()
        .map(|target| FutexWaitv {
            val: u64::from(target.expected),
            uaddr: target.address as u64,
            flags: FUTEX2_SIZE_U32 | if target.private { FUTEX2_PRIVATE } else { 0 },
            reserved: 0,
        })
        .collect();
    // futex_waitv takes an absolute deadline on the clock it is given.
    let mut now = timespec(Duration::ZERO);
    // SAFETY: writes one timespec into `now`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    let nanos = now.tv_nsec as u64 + u64::from(timeout.subsec_nanos());
    let deadline = libc::timespec {
        tv_sec: now.tv_sec
            + timeout.as_secs() as libc::time_t
            + (nanos / 1_000_000_000) as libc::time_t,
        tv_nsec: (nanos % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `waiters` is an array of `waiters.len()` (<= WAITV_MAX) initialised kernel
    // structs and `deadline` a timespec, both alive for the call; the kernel validates each
    // address itself (EFAULT) and only reads the 4-byte words. Every other error (EAGAIN on
    // a mismatch, ETIMEDOUT, EINTR, EFAULT) means "re-check", as for `futex_wait`.
    let result = unsafe {
        libc::syscall(
            libc::SYS_futex_waitv,
            waiters.as_ptr(),
            waiters.len() as libc::c_uint,
            0 as libc::c_uint,
            &deadline as *const libc::timespec,
            libc::CLOCK_MONOTONIC,
        )
    };
    if result < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOSYS) {
        WAITV_MISSING.store(true, std::sync::atomic::Ordering::Relaxed);
        return false;
    }
    true
}

/// Wakes up to `count` threads of this process sleeping on the private word `word` (see
/// [`FutexTarget::private`]).
#[cfg(not(loom))]
pub fn futex_wake_private(word: &AtomicU32, count: i32) {
    // SAFETY: as in `futex_wake`.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            count,
        );
    }
}
