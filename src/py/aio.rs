//! asyncio glue: one helper thread per process that sleeps on the words every awaiting
//! handle of every event loop waits for (`futex_waitv`), and one eventfd per event loop
//! that the helper writes to when one of that loop's waits may be over. The loop watches
//! its eventfd (`loop.add_reader`); `tensorslab._aio` holds the loop side.
//!
//! The helper never takes a message: it only learns *that* a side may be ready
//! ([`Readiness::changed`]) and says so; the loop thread then tries a non-blocking get or
//! put. So a cancelled wait (a timeout, `task.cancel()`, Ctrl-C) loses nothing, and a
//! wake-up for a message another consumer took only costs one more try. The protocol that
//! makes a wake-up impossible to miss is in `channel::readiness`.
//!
//! The helper is a Python `threading.Thread` (daemon, started lazily by `_aio.py`) whose
//! body is [`_aio_serve`]: it runs without the GIL and never returns. Fork-safety: the
//! hub is per process ([`hub`] makes a new one in a fork child, where the parent's thread
//! does not exist and its mutex may have been held at the fork).
use std::collections::HashMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pyo3::prelude::*;
use pyo3::types::PyTuple;

use super::fanout::{decode, Reader};
use super::handles::Handle;
use crate::channel::{Direction, Readiness};
use crate::error::Error;
use crate::shm::current_pid;
use crate::wait::{futex_wait_any, futex_wake_private, FutexTarget, MAX_SLEEP, WAITV_MAX};

/// The helper's sleep with nothing to wait for (new waits wake it at once anyway).
const IDLE_SLEEP: Duration = Duration::from_secs(1);

/// One event loop's eventfd and the tokens of its waits the helper found ready.
struct LoopFd {
    fd: OwnedFd,
    fired: Mutex<Vec<u64>>,
}

/// A registered wait: what to watch, which loop to tell, whether it was told.
struct Entry {
    readiness: Readiness,
    target: Arc<LoopFd>,
    fired: bool,
}

/// This process's registered waits and its helper.
struct Hub {
    pid: u32,
    serving: AtomicBool,
    /// Bumped (then woken, private futex) after every registration: the helper sleeps on
    /// it with the channel words, so a new wait is slept on at once.
    changed: AtomicU32,
    entries: Mutex<HashMap<u64, Entry>>,
}

static HUB: AtomicPtr<Hub> = AtomicPtr::new(std::ptr::null_mut());
static NEXT_TOKEN: AtomicU64 = AtomicU64::new(1);

/// This process's hub. A fork child gets a new one: the parent's helper thread is not
/// there. The parent's hub is leaked (a helper thread that held its mutex at the fork
/// would never let go of it); its waits, which hold channels, are dropped if the mutex is
/// free, without `unregister` (the counts they added are the parent's to take back).
fn hub() -> &'static Hub {
    let pid = current_pid();
    loop {
        let current = HUB.load(Ordering::Acquire);
        if !current.is_null() {
            // SAFETY: a hub that was stored here is never freed (a replaced one is leaked),
            // so the pointer stays valid.
            let hub = unsafe { &*current };
            if hub.pid == pid {
                return hub;
            }
        }
        let fresh = Box::into_raw(Box::new(Hub {
            pid,
            serving: AtomicBool::new(false),
            changed: AtomicU32::new(0),
            entries: Mutex::new(HashMap::new()),
        }));
        // AcqRel: publishes the new hub (Release) to the Acquire loads above.
        match HUB.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) if !current.is_null() => {
                // SAFETY: `current` is the parent's hub, copied by fork; no thread of this
                // process uses it (its pid is not ours) and none can load it any more.
                let inherited = unsafe { &*current };
                if let Ok(mut entries) = inherited.entries.try_lock() {
                    entries.clear();
                }
            }
            Ok(_) => {}
            // SAFETY: `fresh` was never shared.
            Err(_) => drop(unsafe { Box::from_raw(fresh) }),
        }
    }
}

fn lock(entries: &Mutex<HashMap<u64, Entry>>) -> MutexGuard<'_, HashMap<u64, Entry>> {
    // Nothing under the lock can leave the map half-changed: a poisoned one is fine.
    entries
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The helper's loop: sleep on every word awaited now, tell the loops whose waits moved.
fn serve(hub: &'static Hub) {
    let mut targets: Vec<FutexTarget> = Vec::new();
    let mut woken: Vec<Arc<LoopFd>> = Vec::new();
    loop {
        // SeqCst: read before the entries, so a registration after this read (entry
        // inserted, then `changed` bumped: see `AioWatch::arm`) makes the sleep return.
        let changed = hub.changed.load(Ordering::SeqCst);
        targets.clear();
        for entry in lock(&hub.entries).values().filter(|entry| !entry.fired) {
            for target in entry.readiness.futexes() {
                if !targets.contains(&target) {
                    targets.push(target);
                }
            }
        }
        let timeout = if targets.is_empty() {
            IDLE_SLEEP
        } else {
            MAX_SLEEP
        };
        // Room for the helper's own word within `futex_waitv`'s limit: past it, channel
        // words (seen at the `MAX_SLEEP` timeout) go, never the word that tells of a new
        // wait. Last, so the one-word fallback (no `futex_waitv`) sleeps on a channel's word.
        targets.truncate(WAITV_MAX - 1);
        targets.push(FutexTarget {
            address: hub.changed.as_ptr() as usize,
            expected: changed,
            private: true,
        });
        futex_wait_any(&targets, timeout);
        for (token, entry) in lock(&hub.entries).iter_mut() {
            if entry.fired || !entry.readiness.changed() {
                continue;
            }
            entry.fired = true;
            let mut fired = entry
                .target
                .fired
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            fired.push(*token);
            if !woken
                .iter()
                .any(|loop_fd| Arc::ptr_eq(loop_fd, &entry.target))
            {
                woken.push(entry.target.clone());
            }
        }
        for loop_fd in woken.drain(..) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from `one` to an eventfd this `Arc` keeps open. A full
            // counter (EAGAIN) still leaves it readable, which is all the loop needs.
            unsafe { libc::write(loop_fd.fd.as_raw_fd(), std::ptr::from_ref(&one).cast(), 8) };
        }
    }
}

/// The helper thread's body (`tensorslab._aio` runs it in a daemon thread): serves this
/// process's waits without the GIL and never returns, except at once when this process
/// already has a helper.
#[pyfunction]
pub fn _aio_serve(py: Python<'_>) {
    let hub = hub();
    if hub.serving.swap(true, Ordering::AcqRel) {
        return;
    }
    py.detach(|| serve(hub));
}

/// Called in a fork child: drops the parent's waits there now (see [`hub`]), rather than
/// at the child's first asyncio call, so the channels they hold close with their handles.
#[pyfunction]
pub fn _aio_after_fork_in_child() {
    hub();
}

/// An event loop's end: the eventfd the loop watches, and the waits found ready.
#[pyclass(frozen, module = "tensorslab._tensorslab")]
pub struct AioWaker {
    target: Arc<LoopFd>,
}

#[pymethods]
impl AioWaker {
    #[new]
    fn new() -> PyResult<AioWaker> {
        // SAFETY: plain system call; the descriptor is owned below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::os(
                "cannot create the eventfd an asyncio event loop watches",
                std::io::Error::last_os_error(),
            )
            .into());
        }
        Ok(AioWaker {
            target: Arc::new(LoopFd {
                // SAFETY: a new descriptor nothing else owns.
                fd: unsafe { OwnedFd::from_raw_fd(fd) },
                fired: Mutex::new(Vec::new()),
            }),
        })
    }

    /// The eventfd to `add_reader` on.
    fn fileno(&self) -> i32 {
        self.target.fd.as_raw_fd()
    }

    /// Resets the eventfd and returns the tokens of the waits found ready since the last
    /// call (read first, so a token added meanwhile leaves the eventfd readable).
    fn take(&self) -> Vec<u64> {
        let mut count = 0u64;
        // SAFETY: reads at most 8 bytes into `count`; EAGAIN (not readable) is fine.
        unsafe {
            libc::read(
                self.target.fd.as_raw_fd(),
                std::ptr::from_mut(&mut count).cast(),
                8,
            )
        };
        let mut fired = self
            .target
            .fired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        std::mem::take(&mut *fired)
    }
}

/// One awaiting call's view of a handle's side: snapshot, try, arm, await, disarm.
#[pyclass(module = "tensorslab._tensorslab")]
pub struct AioWatch {
    readiness: Readiness,
    token: u64,
    /// The process that armed it (counts in shared memory are that process's to undo).
    armed_in: Option<u32>,
}

impl AioWatch {
    fn disarm_here(&mut self) {
        if let Some(pid) = self.armed_in.take() {
            if pid == current_pid() {
                // Dropped after the lock: the helper never waits on a channel's drop.
                let removed = lock(&hub().entries).remove(&self.token);
                drop(removed);
                self.readiness.unregister();
            }
        }
    }
}

#[pymethods]
impl AioWatch {
    /// Watches `handle`'s side: room to put for a sending handle, a message for a
    /// receiving one. The snapshot is taken now.
    #[new]
    fn new(handle: &Bound<'_, Handle>) -> PyResult<AioWatch> {
        let handle = handle.get();
        let channel = handle.open()?.clone();
        Ok(AioWatch {
            readiness: Readiness::new(channel, Direction::of(handle.side())),
            token: NEXT_TOKEN.fetch_add(1, Ordering::Relaxed),
            armed_in: None,
        })
    }

    /// What `AioWaker.take` returns once this wait may be over.
    #[getter]
    fn token(&self) -> u64 {
        self.token
    }

    /// Re-reads the words; call before each non-blocking attempt.
    fn snapshot(&mut self) {
        self.disarm_here();
        self.readiness.snapshot();
    }

    /// Registers the wait with the helper, to be told through `waker`. False (and not
    /// registered) when the side moved since the snapshot: try again at once.
    fn arm(&mut self, waker: &AioWaker) -> bool {
        self.disarm_here();
        if !self.readiness.register() {
            return false;
        }
        let hub = hub();
        lock(&hub.entries).insert(
            self.token,
            Entry {
                readiness: self.readiness.clone(),
                target: waker.target.clone(),
                fired: false,
            },
        );
        self.armed_in = Some(hub.pid);
        // SeqCst: after the insert; pairs with the helper's load before it reads the
        // entries (it sees the entry, or this bump ends its sleep).
        hub.changed.fetch_add(1, Ordering::SeqCst);
        futex_wake_private(&hub.changed, 1);
        true
    }

    /// Ends the wait (done, timed out or cancelled). Idempotent.
    fn disarm(&mut self) {
        self.disarm_here();
    }
}

impl Drop for AioWatch {
    fn drop(&mut self) {
        self.disarm_here();
    }
}

/// `Reader.get` without waiting, for `get_async`: `(version, value)`, or `None` while no
/// version newer than `newer_than` exists.
#[pyfunction]
pub fn _aio_try_latest<'py>(
    py: Python<'py>,
    reader: &Bound<'py, Reader>,
    newer_than: u64,
    copy: bool,
) -> PyResult<Option<Bound<'py, PyTuple>>> {
    let handle = reader.as_super().get();
    let channel = handle.open()?;
    let started = Instant::now();
    let Some((version, received)) = super::blocking::wait(py, |_| channel.poll_latest(newer_than))?
    else {
        return Ok(None);
    };
    let value = decode(handle, py, channel, received, copy, started)?;
    Ok(Some((version, value).into_pyobject(py)?))
}

/// `tensorslab._aio.<name>(*args)`: the coroutine an `*_async` method returns.
pub(super) fn coroutine<'py>(
    py: Python<'py>,
    name: &str,
    args: impl pyo3::call::PyCallArgs<'py>,
) -> PyResult<Bound<'py, PyAny>> {
    static MODULE: pyo3::sync::PyOnceLock<Py<PyModule>> = pyo3::sync::PyOnceLock::new();
    let module = MODULE.get_or_try_init(py, || py.import("tensorslab._aio").map(Bound::unbind))?;
    module.bind(py).getattr(name)?.call1(args)
}
