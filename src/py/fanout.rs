//! `broadcast()` (`Publisher`, `Subscriber`) and `latest()` (`Writer`, `Reader`): handles
//! of fan-out channels (see `channel::fanout`). They share `Handle` with `Sender` and
//! `Receiver`: closing, pickling (a subscriber's ticket also names its entry), statistics.
use std::sync::Arc;
use std::time::Instant;

use pyo3::exceptions::{PyStopIteration, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyTuple;
use pyo3::PyClassInitializer;

use super::blocking::{deadline, wait, wait_raw};
use super::encode::Encoder;
use super::frame::Frame;
use super::handles::{channel_handle, decode_received, GetError, Handle};
use crate::channel::{Channel, ChannelOptions, Kind, Received, SubscriberId, Ticket};
use crate::error::Error;
use crate::layout::SHARED_PREFIX_LEN;
use crate::procs::Side;
use crate::wait::Deadline;

/// The sending end of a broadcast channel.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Publisher;

/// One subscriber of a broadcast channel.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Subscriber;

/// The writing end of a latest-value mailbox.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Writer;

/// A reader of a latest-value mailbox.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Reader;

/// Encodes `obj` and publishes it on a fan-out channel; returns its sequence number.
fn publish(
    handle: &Handle,
    py: Python<'_>,
    obj: &Bound<'_, PyAny>,
    block: bool,
    timeout: Option<f64>,
) -> PyResult<u64> {
    let channel = handle.open()?;
    let deadline = deadline(timeout)?;
    // No channel id: a fan-out message never references `alloc` buffers (there are none
    // on these channels), everything is copied into its block.
    let mut encoded = Encoder::new(py, channel.strict(), None)?
        .between_processes()
        .encode(obj)
        .map_err(|failure| failure.into_pyerr(py))?;
    let frame = Frame::plan(&encoded)?;
    let frame = &frame;
    let encoded = &mut encoded;
    let (seq, blocked) = wait(py, move |interrupt| {
        let started = Instant::now();
        let allocation = channel.begin_publish(frame.len(), block, deadline, interrupt)?;
        // SAFETY: the block holds the prefix plus `frame.len()` bytes and is ours alone
        // until published; the payload sources are kept alive by `encoded`.
        unsafe { frame.write(encoded, allocation.address.add(SHARED_PREFIX_LEN), true) };
        match channel.publish_shared(&allocation, block, deadline, interrupt) {
            Ok(seq) => Ok((seq, started.elapsed())),
            Err(error) => {
                channel.abort_put(&allocation);
                Err(error)
            }
        }
    })?;
    handle.counters.record(frame.len(), blocked);
    Ok(seq)
}

/// Turns a received shared message into Python objects (read-only NumPy views unless
/// `copy`).
pub(super) fn decode<'py>(
    handle: &Handle,
    py: Python<'py>,
    channel: &Arc<Channel>,
    received: Received,
    copy: bool,
    started: Instant,
) -> PyResult<Bound<'py, PyAny>> {
    let len = received.len;
    let blocked = started.elapsed();
    let (value, _) = decode_received(py, channel, received, copy, true)?;
    handle.counters.record(len, blocked);
    Ok(value)
}

fn subscriber_of(handle: &Handle) -> SubscriberId {
    handle
        .subscriber
        .expect("a Subscriber handle names its entry")
}

/// A new subscriber of `channel`, as a Python handle.
fn new_subscriber(py: Python<'_>, channel: &Arc<Channel>) -> PyResult<Py<Subscriber>> {
    let id = channel.subscribe()?;
    channel.open_handle(Side::Receiver);
    let handle = Handle::with_subscriber(channel.clone(), Side::Receiver, Some(id));
    Py::new(
        py,
        PyClassInitializer::from(handle).add_subclass(Subscriber),
    )
}

#[pymethods]
impl Publisher {
    /// Sends `obj` to every subscriber. Waits for the slowest one with
    /// `overflow="block"` (`Full` after `timeout`); never with `"drop_oldest"`.
    #[pyo3(signature = (obj, block = true, timeout = None))]
    fn put(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        publish(slf.as_super().get(), py, obj, block, timeout).map(drop)
    }

    fn put_nowait(slf: &Bound<'_, Self>, py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<()> {
        Self::put(slf, py, obj, false, None)
    }

    /// `await put_async(obj)`: `put` without blocking the event loop (see `py::aio`).
    #[pyo3(signature = (obj, timeout = None))]
    fn put_async<'py>(
        slf: &Bound<'py, Self>,
        obj: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::aio::coroutine(slf.py(), "put", (slf, obj, timeout))
    }

    /// A new, independent subscriber that starts at the next message published.
    fn subscribe(slf: &Bound<'_, Self>, py: Python<'_>) -> PyResult<Py<Subscriber>> {
        new_subscriber(py, slf.as_super().get().open()?)
    }
}

#[pymethods]
impl Subscriber {
    /// The next message for this subscriber. NumPy arrays are read-only views shared with
    /// the other subscribers; `copy=True` gives private, writable copies.
    #[pyo3(signature = (block = true, timeout = None, copy = false))]
    fn get<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let deadline = deadline(timeout)?;
        Ok(next(slf.as_super().get(), py, block, deadline, copy)?)
    }

    fn get_nowait<'py>(slf: &Bound<'_, Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Self::get(slf, py, false, None, false)
    }

    /// A new, independent subscriber that starts at the next message published.
    fn subscribe(slf: &Bound<'_, Self>, py: Python<'_>) -> PyResult<Py<Subscriber>> {
        new_subscriber(py, slf.as_super().get().open()?)
    }

    /// Messages this subscriber skipped because the publisher dropped them before it read
    /// them (`overflow="drop_oldest"`).
    #[getter]
    fn missed(slf: &Bound<'_, Self>) -> PyResult<u64> {
        let handle = slf.as_super().get();
        Ok(handle.open()?.missed(subscriber_of(handle)))
    }

    /// Messages published that this subscriber has not read yet.
    fn qsize(slf: &Bound<'_, Self>) -> PyResult<u64> {
        let handle = slf.as_super().get();
        Ok(handle.open()?.backlog(subscriber_of(handle)))
    }

    /// `await get_async()`: `get` without blocking the event loop (see `py::aio`).
    #[pyo3(signature = (timeout = None, copy = false))]
    fn get_async<'py>(
        slf: &Bound<'py, Self>,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::aio::coroutine(slf.py(), "get", (slf, timeout, copy))
    }

    fn __aiter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __anext__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        super::aio::coroutine(slf.py(), "next_message", (slf,))
    }

    fn __iter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    fn __next__<'py>(slf: &Bound<'_, Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        match next(slf.as_super().get(), py, true, Deadline::never(), false) {
            Err(GetError::Core(Error::Closed(_))) => Err(PyStopIteration::new_err(())),
            other => Ok(other?),
        }
    }
}

fn next<'py>(
    handle: &Handle,
    py: Python<'py>,
    block: bool,
    deadline: Deadline,
    copy: bool,
) -> Result<Bound<'py, PyAny>, GetError> {
    let channel = handle.open()?;
    let id = subscriber_of(handle);
    let started = Instant::now();
    let received = wait_raw(py, |interrupt| {
        channel.receive_subscriber(id, block, deadline, interrupt)
    })
    .map_err(GetError::Core)?;
    Ok(decode(handle, py, channel, received, copy, started)?)
}

#[pymethods]
impl Writer {
    /// Stores `obj` as the newest version and returns its number (1, 2, ...). Never waits
    /// for readers; waits for slab memory only if the mailbox is at `max_slab_bytes`.
    #[pyo3(signature = (obj, *, timeout = None))]
    fn publish(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        publish(slf.as_super().get(), py, obj, true, timeout).map(|seq| seq + 1)
    }

    /// The newest version published (0 before the first).
    #[getter]
    fn version(slf: &Bound<'_, Self>) -> PyResult<u64> {
        Ok(slf.as_super().get().open()?.latest_version())
    }
}

#[pymethods]
impl Reader {
    /// The newest version published (0 before the first): one read of shared memory.
    #[getter]
    fn version(slf: &Bound<'_, Self>) -> PyResult<u64> {
        Ok(slf.as_super().get().open()?.latest_version())
    }

    /// `(version, value)` of the newest version, waiting until one newer than `newer_than`
    /// exists. Never a torn version: the value is one complete publish.
    #[pyo3(signature = (newer_than = None, timeout = None, copy = false))]
    fn get<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        newer_than: Option<u64>,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let handle = slf.as_super().get();
        let channel = handle.open()?;
        let deadline = deadline(timeout)?;
        let started = Instant::now();
        let (version, received) = wait(py, |interrupt| {
            channel.receive_latest(newer_than.unwrap_or(0), deadline, interrupt)
        })?;
        let value = decode(handle, py, channel, received, copy, started)?;
        (version, value).into_pyobject(py)
    }

    /// `await get_async()`: `get` without blocking the event loop (see `py::aio`).
    #[pyo3(signature = (newer_than = None, timeout = None, copy = false))]
    fn get_async<'py>(
        slf: &Bound<'py, Self>,
        newer_than: Option<u64>,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        super::aio::coroutine(slf.py(), "get_latest", (slf, newer_than, timeout, copy))
    }

    /// `async for version, value in reader`: each version newer than the last one seen.
    fn __aiter__<'py>(slf: &Bound<'py, Self>) -> PyResult<Bound<'py, PyAny>> {
        super::aio::coroutine(slf.py(), "versions", (slf,))
    }

    /// Copies the newest version (a state dict) straight from shared memory into an
    /// `nn.Module`'s parameters and buffers, or into a dict of tensors, checking names,
    /// shapes and dtypes; returns its version. Waits as `get` does.
    #[pyo3(signature = (target, newer_than = None, timeout = None))]
    fn load_into(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        target: &Bound<'_, PyAny>,
        newer_than: Option<u64>,
        timeout: Option<f64>,
    ) -> PyResult<u64> {
        let got = Self::get(slf, py, newer_than, timeout, false)?;
        let version: u64 = got.get_item(0)?.extract()?;
        py.import("tensorslab._weights")?
            .call_method1("load_state", (target, got.get_item(1)?, version))?;
        Ok(version)
    }
}

/// The Python class of a handle rebuilt from a ticket (a subscriber's is
/// `_rebuild_subscriber`'s).
pub(super) fn typed_handle(py: Python<'_>, handle: Handle) -> PyResult<Py<PyAny>> {
    let (kind, side) = (handle.channel().kind(), handle.side());
    let initializer = PyClassInitializer::from(handle);
    Ok(match (kind, side) {
        (Kind::Channel, _) => return channel_handle(py, initializer, side),
        (Kind::Broadcast { .. }, Side::Sender) => {
            Py::new(py, initializer.add_subclass(Publisher))?.into_any()
        }
        (Kind::Broadcast { .. }, Side::Receiver) => {
            Py::new(py, initializer.add_subclass(Subscriber))?.into_any()
        }
        (Kind::Latest, Side::Sender) => Py::new(py, initializer.add_subclass(Writer))?.into_any(),
        (Kind::Latest, Side::Receiver) => Py::new(py, initializer.add_subclass(Reader))?.into_any(),
    })
}

/// Unpickles a subscriber: attaches this process, takes hold of its entry (`Closed` if
/// every handle of it was dropped meanwhile), and redeems the ticket.
#[pyfunction]
pub fn _rebuild_subscriber(
    py: Python<'_>,
    state: &[u8],
    index: u16,
    generation: u32,
) -> PyResult<Py<PyAny>> {
    let ticket = Ticket::from_bytes(state)?;
    let channel = Channel::attach(&ticket)?;
    let id = SubscriberId { index, generation };
    if let Err(error) = channel.open_subscriber(id) {
        channel.discard_ticket(&ticket);
        return Err(error.into());
    }
    channel.redeem(&ticket);
    let handle = Handle::with_subscriber(channel, Side::Receiver, Some(id));
    Ok(Py::new(
        py,
        PyClassInitializer::from(handle).add_subclass(Subscriber),
    )?
    .into_any())
}

fn create(
    kind: Kind,
    capacity: usize,
    slab_bytes: Option<u64>,
    max_slab_bytes: Option<u64>,
) -> PyResult<Arc<Channel>> {
    let channel = Channel::create(&ChannelOptions {
        capacity,
        slab_bytes,
        max_slab_bytes,
        strict: false,
        kind,
        ..Default::default()
    })?;
    channel.open_handle(Side::Sender);
    Ok(channel)
}

/// A broadcast channel: every subscriber receives every message, in order, from the point
/// it subscribed. `depth`: messages retained for the slowest subscriber. `overflow`:
/// `"block"` (the publisher waits for the slowest live subscriber) or `"drop_oldest"` (it
/// never waits; a subscriber that fell behind skips ahead and counts `missed`).
#[pyfunction]
#[pyo3(signature = (depth = 8, *, slab_bytes = None, max_slab_bytes = None, overflow = "block"))]
pub fn broadcast(
    py: Python<'_>,
    depth: i64,
    slab_bytes: Option<u64>,
    max_slab_bytes: Option<u64>,
    overflow: &str,
) -> PyResult<(Py<Publisher>, Py<Subscriber>)> {
    let drop_oldest = match overflow {
        "block" => false,
        "drop_oldest" => true,
        other => {
            return Err(PyValueError::new_err(format!(
                "overflow must be \"block\" or \"drop_oldest\", got {other:?}"
            )))
        }
    };
    let depth = usize::try_from(depth)
        .ok()
        .filter(|&depth| depth > 0)
        .ok_or_else(|| PyValueError::new_err(format!("depth must be positive, got {depth}")))?;
    let channel = create(
        Kind::Broadcast { drop_oldest },
        depth,
        slab_bytes,
        max_slab_bytes,
    )?;
    let subscriber = new_subscriber(py, &channel)?;
    let publisher = Handle::with_subscriber(channel, Side::Sender, None);
    let publisher = Py::new(
        py,
        PyClassInitializer::from(publisher).add_subclass(Publisher),
    )?;
    Ok((publisher, subscriber))
}

/// A latest-value mailbox: `Writer.publish` stores a new version without waiting for
/// readers; `Reader.get` and `Reader.load_into` take the newest.
#[pyfunction]
#[pyo3(signature = (*, slab_bytes = None, max_slab_bytes = None))]
pub fn latest(
    py: Python<'_>,
    slab_bytes: Option<u64>,
    max_slab_bytes: Option<u64>,
) -> PyResult<(Py<Writer>, Py<Reader>)> {
    let channel = create(Kind::Latest, 1, slab_bytes, max_slab_bytes)?;
    channel.open_handle(Side::Receiver);
    let writer = Handle::with_subscriber(channel.clone(), Side::Sender, None);
    let reader = Handle::with_subscriber(channel, Side::Receiver, None);
    Ok((
        Py::new(py, PyClassInitializer::from(writer).add_subclass(Writer))?,
        Py::new(py, PyClassInitializer::from(reader).add_subclass(Reader))?,
    ))
}
