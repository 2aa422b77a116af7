//! Putting an encoded message (shared by `put` and `put_many`), and the batch calls for
//! floods of small messages: `Sender.put_many` and `Receiver.get_many`.
//!
//! `get_many` takes its first message as `get` does and the ones already queued after it
//! in holds of the ring lock of up to 64 messages each (one wake-up of waiting producers
//! per hold, not per message), and decodes them in order. A message that
//! fails to decode is consumed with its error, as with `get`; when messages came before it
//! in the batch, they are returned and the error, with the messages after it, waits in the
//! handle's [`Stash`] for the next call, so nothing is lost or reordered.
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::PyList;

use super::blocking::{quick_then_wait, Attempt};
use super::encode::{Encoded, Encoder};
use super::frame::Frame;
use super::handles::{decode_received, Handle};
use crate::channel::{Channel, Received};
use crate::error::Error;
use crate::shm::current_pid;
use crate::wait::Deadline;

/// Frames up to this size are first put with the GIL held (see `quick_then_wait`); larger
/// ones are copied without it, so other Python threads run meanwhile.
const QUICK_COPY_LIMIT: usize = 256 << 10;

/// Puts one encoded message, waiting for memory and room as `block` and `deadline` allow.
pub(super) fn put_encoded(
    py: Python<'_>,
    handle: &Handle,
    channel: &Arc<Channel>,
    mut encoded: Encoded,
    block: bool,
    deadline: Deadline,
) -> PyResult<()> {
    let frame = Frame::plan(&encoded)?;
    let frame = &frame;
    let alloc_bytes = encoded.alloc_bytes;
    let encoded = &mut encoded;
    let blocked = quick_then_wait(
        py,
        frame.len() <= QUICK_COPY_LIMIT,
        |error| block && matches!(error, Error::Full(_)),
        move |attempt, interrupt| {
            let (block, timed) = match attempt {
                Attempt::Quick => (false, false),
                Attempt::Normal => (block, true),
            };
            let started = timed.then(Instant::now);
            let allocation = channel.begin_put(frame.len(), block, deadline, interrupt)?;
            let mut blocked = started.map_or(Duration::ZERO, |at| at.elapsed());
            // SAFETY: the block holds at least `frame.len()` bytes and is ours alone until
            // published; the payload sources are kept alive by `encoded`.
            unsafe { frame.write(encoded, allocation.address, true) };
            let buffers: Vec<_> = encoded.buffers.iter().map(|held| held.block()).collect();
            let publishing = timed.then(Instant::now);
            if let Err(error) = channel.publish(&allocation, &buffers, block, deadline, interrupt) {
                // Also drops the references to `alloc` buffers that publish counted.
                channel.abort_put(&allocation);
                return Err(error);
            }
            blocked += publishing.map_or(Duration::ZERO, |at| at.elapsed());
            Ok(blocked)
        },
    )?;
    // Statistics only: saturate rather than fail a put that succeeded.
    handle
        .counters
        .record(frame.len().saturating_add(alloc_bytes), blocked);
    Ok(())
}

/// `Sender.put_many`: every message is encoded first (one that cannot be is named, e.g.
/// `objs[3]`, and nothing is put), then put in order. Giving up on room (`Full`, timeout)
/// puts the ones before it only; the exception's `sent` attribute says how many.
pub(super) fn put_many(
    py: Python<'_>,
    handle: &Handle,
    objs: &Bound<'_, PyAny>,
    block: bool,
    deadline: Deadline,
) -> PyResult<()> {
    let channel = handle.open()?;
    let mut encoded = vec![];
    for (index, obj) in objs.try_iter()?.enumerate() {
        let obj = obj?;
        encoded.push(
            Encoder::new(py, channel.strict(), Some(channel.id()))?
                .between_processes()
                .encode(&obj)
                .map_err(|failure| failure.into_pyerr_at(py, &format!("objs[{index}]")))?,
        );
    }
    let total = encoded.len();
    for (sent, message) in encoded.into_iter().enumerate() {
        if let Err(error) = put_encoded(py, handle, channel, message, block, deadline) {
            let value = error.value(py);
            let _ = value.setattr("sent", sent);
            let _ = value.call_method1(
                "add_note",
                (format!(
                    "put_many: {sent} of {total} messages were put before this one"
                ),),
            );
            return Err(error);
        }
    }
    Ok(())
}

/// What a `get_many` took off the ring and did not return (see the module docs).
#[derive(Default)]
pub(crate) struct Stash {
    /// The process the entries belong to: a fork child copies the list but owns none of it.
    pid: u32,
    entries: VecDeque<Stashed>,
}

enum Stashed {
    Message(Received),
    Failed(PyErr),
}

impl Stash {
    /// Takes the stash for this process; empty in any other (a fork child's copy).
    fn take(slot: &Mutex<Stash>) -> VecDeque<Stashed> {
        let mut stash = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let entries = std::mem::take(&mut stash.entries);
        if stash.pid == current_pid() {
            entries
        } else {
            // Another process's messages: this one must neither deliver nor release them.
            VecDeque::new()
        }
    }

    /// Puts back what a call took and did not return. Another thread of this process may
    /// have stashed its own leftovers meanwhile (a decode runs Python code, which lets
    /// other threads run): those came off the ring after ours, so ours go in front of
    /// them, and neither replaces the other. A handle closed meanwhile has released its
    /// stash already: the messages are released here instead.
    fn keep(handle: &Handle, mut entries: VecDeque<Stashed>) {
        if entries.is_empty() {
            return;
        }
        let mut stash = handle
            .stash
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Under the stash lock: `close` marks the handle closed before it takes the stash,
        // so either this sees the mark or that `take` comes after this and sees the entries.
        if handle.is_closed() {
            drop(stash);
            return Stash::release_entries(handle.channel(), entries);
        }
        let here = current_pid();
        if stash.pid == here {
            entries.append(&mut stash.entries);
        }
        stash.pid = here;
        stash.entries = entries;
    }

    /// True when the next call must be served from the stash.
    pub(super) fn is_empty(slot: &Mutex<Stash>) -> bool {
        let stash = slot.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        stash.entries.is_empty() || stash.pid != current_pid()
    }

    /// Gives back every stashed message (the handle is closing); errors are dropped.
    pub(super) fn release(slot: &Mutex<Stash>, channel: &Channel) {
        Stash::release_entries(channel, Stash::take(slot));
    }

    fn release_entries(channel: &Channel, entries: VecDeque<Stashed>) {
        for entry in entries {
            if let Stashed::Message(received) = entry {
                channel.release_message(received.block);
            }
        }
    }
}

/// `Receiver.get_many`: waits for a first message as `get` does (`Empty` when none came in
/// time), then returns it with up to `max_messages - 1` more already queued.
pub(super) fn get_many<'py>(
    py: Python<'py>,
    handle: &Handle,
    max_messages: usize,
    block: bool,
    deadline: Deadline,
    copy: bool,
) -> PyResult<Bound<'py, PyList>> {
    if max_messages == 0 {
        return Err(PyValueError::new_err(
            "max_messages must be at least 1, got 0",
        ));
    }
    let channel = handle.open()?;
    let mut batch = Stash::take(&handle.stash);
    // The wait, counted once for the batch, on its first message.
    let mut blocked = Duration::ZERO;
    if batch.is_empty() {
        let started = Instant::now();
        let received = quick_then_wait(
            py,
            true,
            |error| block && matches!(error, Error::Empty(_)),
            |attempt, interrupt| match attempt {
                Attempt::Quick => channel.receive_many(max_messages, false, deadline, interrupt),
                Attempt::Normal => channel.receive_many(max_messages, block, deadline, interrupt),
            },
        )?;
        blocked = started.elapsed();
        batch = received.into_iter().map(Stashed::Message).collect();
    }
    let list = PyList::empty(py);
    while list.len() < max_messages {
        let Some(entry) = batch.pop_front() else {
            break;
        };
        let outcome = match entry {
            Stashed::Message(received) => {
                let len = received.len;
                decode_received(py, channel, received, copy, false)
                    .map(|(value, alloc_bytes)| (value, len.saturating_add(alloc_bytes as usize)))
            }
            Stashed::Failed(error) => Err(error),
        };
        match outcome {
            Ok((value, bytes)) => {
                handle.counters.record(bytes, std::mem::take(&mut blocked));
                if let Err(error) = list.append(value) {
                    // The value is lost with the error; the rest still wait for the next call.
                    Stash::keep(handle, batch);
                    return Err(error);
                }
            }
            Err(error) if list.is_empty() => {
                Stash::keep(handle, batch);
                return Err(error);
            }
            Err(error) => {
                batch.push_front(Stashed::Failed(error));
                break;
            }
        }
    }
    Stash::keep(handle, batch);
    Ok(list)
}
