//! Atomics facade: `std` atomics normally, `loom`'s under `cfg(loom)` so the ring and the
//! lock can be model-checked. Everything in shared memory uses these types.
#[cfg(loom)]
pub(crate) use loom::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
#[cfg(not(loom))]
pub(crate) use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

/// Gives up the processor inside a bounded spin (`loom` needs to see it to explore).
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::hint::spin_loop();
}

/// Gives the processor to another thread (a preempted lock holder, say).
#[inline]
pub(crate) fn yield_now() {
    #[cfg(loom)]
    loom::thread::yield_now();
    #[cfg(not(loom))]
    std::thread::yield_now();
}

/// Runs the loom model `f`, `preemptions` deep at least: `LOOM_MAX_PREEMPTIONS` (which
/// `make loom` sets to 2) may ask for more, and unset leaves the search unbounded. For the
/// models small enough to go deeper than the rest.
#[cfg(all(test, loom))]
pub(crate) fn model(preemptions: usize, f: impl Fn() + Sync + Send + 'static) {
    let mut builder = loom::model::Builder::new();
    builder.preemption_bound = builder.preemption_bound.map(|bound| bound.max(preemptions));
    builder.check(f);
}
