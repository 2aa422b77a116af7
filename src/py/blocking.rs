//! The one way the binding waits: every blocking call (put, get, alloc, wait_for_all_ack)
//! goes through [`wait`], which releases the GIL, bounds the wait by the caller's timeout,
//! and wakes at least every `wait::MAX_SLEEP` (50 ms) to run Python's signal handlers, so
//! Ctrl-C interrupts a blocked call promptly and leaves the channel usable.
use std::time::Duration;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::error::{Error, Result};
use crate::wait::{Deadline, Interrupt};

/// `timeout=` as the standard library's queues take it: `None` waits forever.
pub fn deadline(timeout: Option<f64>) -> PyResult<Deadline> {
    match timeout {
        None => Ok(Deadline::never()),
        Some(seconds) if seconds.is_finite() && seconds >= 0.0 => Ok(Deadline::after(Some(
            Duration::from_secs_f64(seconds.min(1e9)),
        ))),
        Some(seconds) => Err(PyValueError::new_err(format!(
            "timeout must be a non-negative number, got {seconds}"
        ))),
    }
}

/// `spin_us=`: how long a blocked get or put spins before sleeping; `None` is the default.
pub fn spin_duration(spin_us: Option<f64>) -> PyResult<Duration> {
    let max = crate::channel::MAX_SPIN;
    match spin_us {
        None => Ok(crate::channel::SPIN),
        Some(us) if us.is_finite() && us >= 0.0 && us <= max.as_secs_f64() * 1e6 => {
            Ok(Duration::from_secs_f64(us / 1e6))
        }
        Some(us) => Err(PyValueError::new_err(format!(
            "spin_us must be between 0 and {} (microseconds), got {us}",
            max.as_micros()
        ))),
    }
}

/// Runs `work` without the GIL. `work` gets an interrupt hook to call at every wake-up: it
/// re-takes the GIL briefly and runs pending signal handlers; if one raised (Ctrl-C), the
/// exception is kept for the caller and the wait is abandoned with `Error::Interrupted`.
pub fn wait<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(Interrupt) -> Result<T> + Send,
) -> PyResult<T> {
    wait_raw(py, work).map_err(PyErr::from)
}

/// [`wait`] keeping the core error, for callers that react to one kind (iteration ends on
/// `Closed`). `Error::Interrupted` means the Python exception is set, ready to be taken.
pub fn wait_raw<T: Send>(
    py: Python<'_>,
    work: impl FnOnce(Interrupt) -> Result<T> + Send,
) -> Result<T> {
    py.detach(|| {
        let mut check = || {
            Python::attach(|py| match py.check_signals() {
                Ok(()) => Ok(()),
                Err(error) => {
                    error.restore(py);
                    Err(Error::Interrupted)
                }
            })
        };
        work(&mut check)
    })
}

/// How a call is first tried: once in a quick scope with the GIL held, or directly as
/// [`wait_raw`] does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attempt {
    /// Held the GIL; never waits (see `wait::quick_scope`); the call must not block.
    Quick,
    /// Without the GIL; may block as the caller asked.
    Normal,
}

/// Runs `work(Attempt::Quick, ..)` with the GIL held and nothing allowed to wait; when it
/// would have had to (`Error::WouldBlock`, or an error `retry` accepts: `Full`/`Empty` of
/// a call that may block), runs `work(Attempt::Normal, ..)` as [`wait_raw`]. A call that
/// finds room or a message at once so never gives up the GIL: releasing and re-taking it
/// costs a few hundred nanoseconds alone, and the re-take can wait for another Python
/// thread's whole switch interval (5 ms). `quick == false` skips the first try (large
/// copies, which other threads should not wait for).
pub fn quick_then_wait<T: Send>(
    py: Python<'_>,
    quick: bool,
    retry: impl Fn(&Error) -> bool,
    mut work: impl FnMut(Attempt, Interrupt) -> Result<T> + Send,
) -> Result<T> {
    if quick {
        let outcome = {
            let _scope = crate::wait::quick_scope(true);
            // Nothing waits in a quick scope, so there is no wake-up to check signals at.
            work(Attempt::Quick, &mut || Ok(()))
        };
        match outcome {
            Err(Error::WouldBlock) => {}
            Err(error) if retry(&error) => {}
            done => return done,
        }
    }
    wait_raw(py, |interrupt| work(Attempt::Normal, interrupt))
}
