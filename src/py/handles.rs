//! `Sender`, `Receiver` and `channel()`: thin wrappers that convert arguments, call the core
//! channel, and keep per-handle statistics. Pickling a handle produces a ticket (see
//! `channel::Ticket`) that counts as an open handle until another process redeems it.
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pyo3::exceptions::{PyStopIteration, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};
use pyo3::PyClassInitializer;

use super::alloc;
use super::batch;
use super::blocking::{deadline, quick_then_wait, spin_duration, wait, Attempt};
use super::decode::{Decoder, Mode};
use super::encode::Encoder;
use super::frame::Frame;
use super::lease::MessageLease;
use crate::channel::{Channel, ChannelOptions, Kind, Received, SubscriberId, Ticket};
use crate::error::Error;
use crate::header::{read_buffers, FrameHeader, Reader};
use crate::procs::Side;
use crate::wait::Deadline;

/// Counters of one handle, for `stats()`.
#[derive(Default)]
pub(super) struct Counters {
    messages: AtomicU64,
    bytes: AtomicU64,
    blocked_nanos: AtomicU64,
}

impl Counters {
    pub(super) fn record(&self, bytes: usize, blocked: std::time::Duration) {
        self.messages.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        self.blocked_nanos
            .fetch_add(blocked.as_nanos() as u64, Ordering::Relaxed);
    }
}

/// What both ends share: the channel, their side, whether closed, counters. The base class
/// of `Sender` and `Receiver`; never created on its own.
#[pyclass(frozen, subclass, module = "tensorslab._tensorslab")]
pub struct Handle {
    channel: Arc<Channel>,
    side: Side,
    closed: AtomicBool,
    /// The process in which this handle is counted as open. A fork child that inherited it
    /// counts it once it was handed to the child or used there (see `channel::registry`).
    counted_in: AtomicU32,
    pub(super) counters: Counters,
    /// Messages a `get_many` took and has not returned yet (see `batch`).
    pub(super) stash: std::sync::Mutex<batch::Stash>,
    /// A broadcast subscriber's entry (see `channel::fanout`), held by this handle in the
    /// process `subscriber_in` names (as `counted_in`, for the entry's holder bits).
    pub(super) subscriber: Option<SubscriberId>,
    subscriber_in: AtomicU32,
}

impl Handle {
    fn new(channel: Arc<Channel>, side: Side) -> Handle {
        Handle::with_subscriber(channel, side, None)
    }

    /// A handle of `channel` on `side`; `subscriber` is already held by this process.
    pub(super) fn with_subscriber(
        channel: Arc<Channel>,
        side: Side,
        subscriber: Option<SubscriberId>,
    ) -> Handle {
        Handle {
            counted_in: AtomicU32::new(channel.pid()),
            subscriber_in: AtomicU32::new(channel.pid()),
            channel,
            side,
            closed: AtomicBool::new(false),
            counters: Counters::default(),
            stash: Default::default(),
            subscriber,
        }
    }

    fn counted_here(&self) -> bool {
        self.counted_in.load(Ordering::Relaxed) == self.channel.pid()
            || self.channel.counts_inherited()
    }

    /// Counts an inherited handle in this process (it was handed to it, or is being used).
    fn adopt(&self) {
        let here = self.channel.pid();
        let counted_in = self.counted_in.load(Ordering::Relaxed);
        if counted_in != here
            && !self.closed.load(Ordering::Relaxed)
            && self.channel.owned_here()
            && self
                .counted_in
                .compare_exchange(counted_in, here, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
            && !self.channel.counts_inherited()
        {
            self.channel.open_handle(self.side);
        }
        let subscriber_in = self.subscriber_in.load(Ordering::Relaxed);
        if let Some(id) = self.subscriber {
            // After a bare fork the child took hold of every inherited subscriber already.
            if subscriber_in != here
                && !self.closed.load(Ordering::Relaxed)
                && self.channel.owned_here()
                && !self.channel.counts_inherited()
                && self
                    .subscriber_in
                    .compare_exchange(subscriber_in, here, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                // A subscriber closed everywhere else meanwhile fails its next `get`.
                let _ = self.channel.open_subscriber(id);
            }
        }
    }

    fn name(&self) -> &'static str {
        match (self.channel.kind(), self.side) {
            (Kind::Channel, Side::Sender) => "Sender",
            (Kind::Channel, Side::Receiver) => "Receiver",
            (Kind::Broadcast { .. }, Side::Sender) => "Publisher",
            (Kind::Broadcast { .. }, Side::Receiver) => "Subscriber",
            (Kind::Latest, Side::Sender) => "Writer",
            (Kind::Latest, Side::Receiver) => "Reader",
        }
    }

    /// The channel, or `ValueError` after `close()` (as `multiprocessing.Queue`).
    pub(super) fn open(&self) -> PyResult<&Arc<Channel>> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(PyValueError::new_err(format!(
                "{} of channel {:016x} is closed",
                self.name(),
                self.channel.id()
            )));
        }
        self.adopt();
        Ok(&self.channel)
    }

    fn close(&self) {
        let counted = self.counted_here();
        if self.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        batch::Stash::release(&self.stash, &self.channel);
        if counted {
            self.channel.close_handle(self.side);
        }
        if let Some(id) = self.subscriber {
            if self.subscriber_in.load(Ordering::Relaxed) == self.channel.pid()
                || self.channel.counts_inherited()
            {
                self.channel.close_subscriber(id);
            }
        }
    }

    /// Pickles the handle as a ticket. Tickets handed to `multiprocessing` children are
    /// tracked in Python (`_fork.py`) so that those of children that exited without loading
    /// them are cancelled, instead of holding the channel open and a pending slot forever.
    fn reduce<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        let channel = self.open()?;
        let tracking = py.import("tensorslab._fork")?;
        tracking.call_method0("sweep_tickets")?;
        let ticket = channel.ticket(self.side)?;
        let module = py.import("tensorslab._tensorslab")?;
        let state = PyBytes::new(py, &ticket.to_bytes());
        let Some(id) = self.subscriber else {
            tracking.call_method1("ticket_issued", (&state,))?;
            let rebuild = module.getattr("_rebuild")?;
            return PyTuple::new(py, [rebuild, PyTuple::new(py, [state])?.into_any()]);
        };
        if let Err(error) = channel.pin_subscriber(id, ticket.pending) {
            channel.cancel_ticket(&ticket);
            return Err(error.into());
        }
        tracking.call_method1("ticket_issued", (&state,))?;
        let rebuild = module.getattr("_rebuild_subscriber")?;
        let args = (state, id.index, id.generation).into_pyobject(py)?;
        PyTuple::new(py, [rebuild, args.into_any()])
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let shared = self.channel.shared_stats();
        let dict = PyDict::new(py);
        let (sent, received) = match self.side {
            Side::Sender => (&self.counters, None),
            Side::Receiver => (&Counters::default(), Some(&self.counters)),
        };
        let zero = Counters::default();
        let received = received.unwrap_or(&zero);
        let seconds = |nanos: &AtomicU64| nanos.load(Ordering::Relaxed) as f64 / 1e9;
        dict.set_item("slab_mapped_bytes", shared.mapped_bytes)?;
        dict.set_item("slab_used_bytes", shared.used_bytes)?;
        dict.set_item("messages_in_flight", shared.used_blocks)?;
        dict.set_item("queued", shared.queued)?;
        dict.set_item("capacity", shared.capacity)?;
        dict.set_item("max_slab_bytes", shared.max_slab_bytes)?;
        dict.set_item("segments", shared.segments)?;
        dict.set_item("senders", shared.senders)?;
        dict.set_item("receivers", shared.receivers)?;
        dict.set_item("unacknowledged", shared.outstanding)?;
        dict.set_item("processes", shared.processes)?;
        dict.set_item("liveness_sweeps", shared.liveness_sweeps)?;
        dict.set_item("spin_us", self.channel.spin_time().as_secs_f64() * 1e6)?;
        dict.set_item("messages_sent", sent.messages.load(Ordering::Relaxed))?;
        dict.set_item("bytes_sent", sent.bytes.load(Ordering::Relaxed))?;
        dict.set_item("put_blocked_seconds", seconds(&sent.blocked_nanos))?;
        dict.set_item(
            "messages_received",
            received.messages.load(Ordering::Relaxed),
        )?;
        dict.set_item("bytes_received", received.bytes.load(Ordering::Relaxed))?;
        dict.set_item("get_blocked_seconds", seconds(&received.blocked_nanos))?;
        match (self.channel.kind(), self.subscriber) {
            (Kind::Latest, _) => dict.set_item("version", self.channel.latest_version())?,
            (_, Some(id)) => {
                dict.set_item("missed", self.channel.missed(id))?;
                dict.set_item("backlog", self.channel.backlog(id))?;
            }
            _ => {}
        }
        Ok(dict)
    }

    fn repr(&self) -> String {
        let state = if self.closed.load(Ordering::Relaxed) {
            " closed"
        } else {
            ""
        };
        format!(
            "<tensorslab.{} of channel {:016x}{state}>",
            self.name(),
            self.channel.id()
        )
    }
}

#[pymethods]
impl Handle {
    /// Messages queued and not yet taken (approximate while others put and get).
    fn qsize(&self) -> PyResult<u64> {
        Ok(self.open()?.queued())
    }

    #[pyo3(name = "close")]
    fn py_close(&self) {
        self.close();
    }

    #[getter]
    fn closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    #[pyo3(name = "stats")]
    fn py_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        self.stats(py)
    }

    fn __enter__(slf: Bound<'_, Self>) -> Bound<'_, Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) {
        self.close();
    }

    fn __reduce__<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyTuple>> {
        self.reduce(py)
    }

    fn __repr__(&self) -> String {
        self.repr()
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.close();
    }
}

/// The sending end of a channel.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Sender;

/// The receiving end of a channel.
#[pyclass(frozen, extends = Handle, module = "tensorslab._tensorslab")]
pub struct Receiver;

#[pymethods]
impl Sender {
    #[pyo3(signature = (obj, block = true, timeout = None))]
    fn put(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        obj: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let channel = slf.as_super().get().open()?;
        let deadline = deadline(timeout)?;
        let encoded = Encoder::new(py, channel.strict(), Some(channel.id()))?
            .between_processes()
            .encode(obj)
            .map_err(|failure| failure.into_pyerr(py))?;
        batch::put_encoded(py, slf.as_super().get(), channel, encoded, block, deadline)
    }

    /// Puts every object of `objs` in order (see `batch::put_many`).
    #[pyo3(signature = (objs, block = true, timeout = None))]
    fn put_many(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        objs: &Bound<'_, PyAny>,
        block: bool,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        batch::put_many(py, slf.as_super().get(), objs, block, deadline(timeout)?)
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

    /// True when a message with `nbytes` of payload could be put right now without waiting.
    #[pyo3(signature = (nbytes = 0))]
    fn has_space(slf: &Bound<'_, Self>, nbytes: usize) -> PyResult<bool> {
        let channel = slf.as_super().get().open()?;
        Ok(channel.has_space(nbytes.saturating_add(1024)))
    }

    #[pyo3(signature = (timeout = None))]
    fn wait_for_all_ack(
        slf: &Bound<'_, Self>,
        py: Python<'_>,
        timeout: Option<f64>,
    ) -> PyResult<bool> {
        let channel = slf.as_super().get().open()?;
        let deadline = deadline(timeout)?;
        wait(py, |interrupt| {
            channel.wait_for_all_ack(deadline, interrupt)
        })
    }

    /// An uninitialised array (NumPy dtype) or tensor (torch dtype) in slab memory; with no
    /// `dtype`, `shape` is a spec: a nested structure of `(shape, dtype)` leaves, all
    /// allocated in one block (see `py::alloc`).
    #[pyo3(signature = (shape, dtype = None, *, timeout = None))]
    fn alloc<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        shape: &Bound<'py, PyAny>,
        dtype: Option<&Bound<'py, PyAny>>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let channel = slf.as_super().get().open()?;
        match dtype {
            Some(dtype) => alloc::alloc_one(py, channel, shape, dtype, timeout),
            None => alloc::alloc_structure(py, channel, shape, false, timeout),
        }
    }

    /// Uninitialised arrays and tensors in one block, in the structure of `example` (a
    /// nested structure of arrays and tensors) and with its shapes and dtypes.
    #[pyo3(signature = (example, *, timeout = None))]
    fn alloc_like<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        example: &Bound<'py, PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let channel = slf.as_super().get().open()?;
        alloc::alloc_structure(py, channel, example, true, timeout)
    }
}

#[pymethods]
impl Receiver {
    #[pyo3(signature = (block = true, timeout = None, copy = false))]
    fn get<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        block: bool,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyAny>> {
        let deadline = deadline(timeout)?;
        receive(slf.as_super().get(), py, block, deadline, copy)
            .map_err(|error| error.into_pyerr(py))
    }

    /// The next message and up to `max_messages - 1` more already queued, as a list (see
    /// `batch::get_many`).
    #[pyo3(signature = (max_messages = 64, block = true, timeout = None, copy = false))]
    fn get_many<'py>(
        slf: &Bound<'_, Self>,
        py: Python<'py>,
        max_messages: usize,
        block: bool,
        timeout: Option<f64>,
        copy: bool,
    ) -> PyResult<Bound<'py, PyList>> {
        let deadline = deadline(timeout)?;
        batch::get_many(
            py,
            slf.as_super().get(),
            max_messages,
            block,
            deadline,
            copy,
        )
    }

    fn get_nowait<'py>(slf: &Bound<'_, Self>, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        Self::get(slf, py, false, None, false)
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
        match receive(slf.as_super().get(), py, true, Deadline::never(), false) {
            Err(GetError::Core(Error::Closed(_))) => Err(PyStopIteration::new_err(())),
            other => other.map_err(|error| error.into_pyerr(py)),
        }
    }
}

pub(super) fn new_handle(channel: Arc<Channel>, side: Side) -> PyClassInitializer<Handle> {
    PyClassInitializer::from(Handle::new(channel, side))
}

/// A failed `get`: a core error (kept apart so iteration can tell `Closed`) or a Python one.
pub(super) enum GetError {
    Core(Error),
    Python(PyErr),
}

impl GetError {
    fn into_pyerr(self, _py: Python<'_>) -> PyErr {
        self.into()
    }
}

impl From<GetError> for PyErr {
    fn from(error: GetError) -> PyErr {
        match error {
            GetError::Core(error) => error.into(),
            GetError::Python(error) => error,
        }
    }
}

impl From<PyErr> for GetError {
    fn from(error: PyErr) -> GetError {
        GetError::Python(error)
    }
}

fn receive<'py>(
    handle: &Handle,
    py: Python<'py>,
    block: bool,
    deadline: Deadline,
    copy: bool,
) -> Result<Bound<'py, PyAny>, GetError> {
    let channel = handle.open()?;
    if !batch::Stash::is_empty(&handle.stash) {
        let list = batch::get_many(py, handle, 1, block, deadline, copy)?;
        return Ok(list.get_item(0)?);
    }
    let mut blocked = Duration::ZERO;
    let blocked_out = &mut blocked;
    let received = quick_then_wait(
        py,
        true,
        |error| block && matches!(error, Error::Empty(_)),
        |attempt, interrupt| match attempt {
            Attempt::Quick => channel.receive(false, deadline, interrupt),
            Attempt::Normal => {
                let started = Instant::now();
                let received = channel.receive(block, deadline, interrupt);
                *blocked_out = started.elapsed();
                received
            }
        },
    )
    .map_err(GetError::Core)?;
    let len = received.len;
    let (value, alloc_bytes) = decode_received(py, channel, received, copy, false)?;
    handle.counters.record(len + alloc_bytes as usize, blocked);
    Ok(value)
}

/// Turns a received block into the message: views held by a lease, or copies (and the
/// block released at once) with `copy`. `readonly`: NumPy views are not writable (several
/// readers share them).
pub(super) fn decode_received<'py>(
    py: Python<'py>,
    channel: &Arc<Channel>,
    received: Received,
    copy: bool,
    readonly: bool,
) -> PyResult<(Bound<'py, PyAny>, u64)> {
    let refuse = |error: Error| -> PyErr {
        channel.release_message(received.block);
        error.into()
    };
    // SAFETY: `receive` checked the block is in use and holds `len` bytes; it is ours until
    // released, which the lease below does no earlier than when its last view is gone.
    let (header, stream) = unsafe { FrameHeader::copy_from_shared(received.address, received.len) }
        .map_err(&refuse)?;
    // The value stream is decoded from that private copy; only payloads are read in place.
    let mut input = Reader::new(&stream);
    let buffers = read_buffers(&mut input).map_err(&refuse)?;
    // Releasing the message also drops its references to the `alloc` buffers it lists.
    let lease = Arc::new(MessageLease::new(channel.clone(), received.block));
    // SAFETY: as above; the payload area lies inside the frame (`copy_from_shared` checked).
    let frame = unsafe { std::slice::from_raw_parts(received.address, received.len) };
    let area = &frame[header.payload_offset as usize..];
    let mode = if copy {
        Mode::Copy
    } else {
        Mode::View(lease.clone())
    };
    let mut decoder = Decoder::new(py, input, area, &buffers, mode, Some(channel), true)?;
    decoder.readonly = readonly;
    let value = decoder.message();
    drop(lease);
    Ok((value?, decoder.external_bytes.get()))
}

#[pyfunction]
#[pyo3(signature = (capacity = 64, *, slab_bytes = None, max_slab_bytes = None, strict = false, spin_us = None))]
pub fn channel(
    capacity: i64,
    slab_bytes: Option<u64>,
    max_slab_bytes: Option<u64>,
    strict: bool,
    spin_us: Option<f64>,
) -> PyResult<(Py<Sender>, Py<Receiver>)> {
    let capacity = usize::try_from(capacity)
        .map_err(|_| PyValueError::new_err(format!("capacity must be positive, got {capacity}")))?;
    let channel = Channel::create(&ChannelOptions {
        capacity,
        slab_bytes,
        max_slab_bytes,
        strict,
        kind: Kind::Channel,
        spin: spin_duration(spin_us)?,
    })?;
    channel.open_handle(Side::Sender);
    channel.open_handle(Side::Receiver);
    Python::attach(|py| {
        Ok((
            Py::new(
                py,
                new_handle(channel.clone(), Side::Sender).add_subclass(Sender),
            )?,
            Py::new(
                py,
                new_handle(channel, Side::Receiver).add_subclass(Receiver),
            )?,
        ))
    })
}

/// Unpickles a handle: attaches this process to the channel and redeems the ticket.
#[pyfunction]
pub fn _rebuild(py: Python<'_>, state: &[u8]) -> PyResult<Py<PyAny>> {
    let ticket = Ticket::from_bytes(state)?;
    let channel = Channel::attach(&ticket)?;
    channel.redeem(&ticket);
    super::fanout::typed_handle(py, Handle::new(channel, ticket.side))
}

/// A point-to-point channel's handle as its Python class.
pub(super) fn channel_handle(
    py: Python<'_>,
    handle: PyClassInitializer<Handle>,
    side: Side,
) -> PyResult<Py<PyAny>> {
    Ok(match side {
        Side::Sender => Py::new(py, handle.add_subclass(Sender))?.into_any(),
        Side::Receiver => Py::new(py, handle.add_subclass(Receiver))?.into_any(),
    })
}

impl Handle {
    pub(super) fn channel(&self) -> &Arc<Channel> {
        &self.channel
    }

    pub(super) fn side(&self) -> Side {
        self.side
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }
}

#[pyfunction]
pub fn dumps<'py>(py: Python<'py>, obj: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyBytes>> {
    let mut encoded = Encoder::new(py, false, None)?
        .encode(obj)
        .map_err(|failure| failure.into_pyerr(py))?;
    let frame = Frame::plan(&encoded)?;
    PyBytes::new_with(py, frame.len(), |buffer| {
        // SAFETY: `buffer` is exactly `frame.len()` fresh bytes.
        unsafe { frame.write(&mut encoded, buffer.as_mut_ptr(), false) };
        Ok(())
    })
}

#[pyfunction]
#[pyo3(signature = (data, *, allow_pickle = false))]
pub fn loads<'py>(
    py: Python<'py>,
    data: &Bound<'py, PyAny>,
    allow_pickle: bool,
) -> PyResult<Bound<'py, PyAny>> {
    // The limited API of Python 3.9 has no buffer protocol; other bytes-like objects are
    // turned into bytes first (one copy, outside the hot path).
    let bytes = match data.cast::<PyBytes>() {
        Ok(bytes) => bytes.clone(),
        Err(_) => py
            .get_type::<PyBytes>()
            .call1((data,))
            .map_err(|_| {
                PyTypeError::new_err(format!(
                    "loads expects bytes-like data, got {}",
                    super::encode::type_name(data)
                ))
            })?
            .cast_into::<PyBytes>()
            .map_err(PyErr::from)?,
    };
    let frame = bytes.as_bytes();
    let header = FrameHeader::read(frame)?;
    let mut input = Reader::new(header.stream(frame));
    if !read_buffers(&mut input)?.is_empty() {
        return Err(Error::Decode(
            "corrupt data: it references channel memory (not made by dumps)".into(),
        )
        .into());
    }
    let area = &frame[header.payload_offset as usize..];
    Decoder::new(py, input, area, &[], Mode::Copy, None, allow_pickle)?.message()
}

/// Cancels a ticket this process issued that will never be loaded (its child exited):
/// the handle it carried stops counting. False if it was already redeemed or dropped.
#[pyfunction]
pub fn _drop_ticket(state: &[u8]) -> PyResult<bool> {
    let ticket = Ticket::from_bytes(state)?;
    Ok(Channel::find_attached(ticket.channel_id)
        .is_some_and(|channel| channel.cancel_ticket(&ticket)))
}

#[pyfunction]
pub fn _before_fork() {
    crate::channel::before_fork();
}

#[pyfunction]
pub fn _after_fork_in_parent() {
    crate::channel::after_fork_in_parent();
}

/// Registers a fork child. `handed`: the handles given to the `multiprocessing.Process`
/// being started (counted at once), or `None` after a bare `os.fork()` (all count).
#[pyfunction]
#[pyo3(signature = (handed = None))]
pub fn _after_fork_in_child(handed: Option<Vec<Bound<'_, PyAny>>>) {
    crate::channel::after_fork_in_child(handed.is_none(), || {
        for handle in handed.iter().flatten() {
            if let Ok(handle) = handle.cast::<Handle>() {
                handle.get().adopt();
            }
        }
    });
}
