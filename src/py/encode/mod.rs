//! Python value -> value stream + payload list. Runs with the GIL; copies nothing big:
//! payloads are recorded as (address, layout) and copied later, without the GIL, straight
//! into the slab block (`copy_payloads`).
//!
//! Arrays and tensors are in `arrays.rs`, dates in `dates.rs`, the payload copy in
//! `copy.rs`.
//!
//! Exact builtin types are tested first (one pointer compare each), so the common message
//! of dicts, lists, numbers, strings and arrays never reaches the slower `isinstance` chain.
use std::sync::Arc;

use numpy::{PyArrayDescr, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyComplex, PyDict, PyEllipsis, PyFloat, PyFrozenSet, PyInt,
    PyList, PyRange, PySet, PySlice, PyString, PyTuple, PyType,
};

use super::lease::AllocLease;
use super::types::{torch_if_loaded, types, Types};
use crate::header::{ArrayKind, Tag, Writer, FLAG_PICKLE, MAX_DEPTH};

mod arrays;
mod copy;
mod dates;

pub use copy::copy_payloads;

/// Bytes objects larger than this travel as payloads, not inside the value stream.
const INLINE_BYTES: usize = 64 << 10;

/// Where a payload's bytes are read from. The addresses stay valid while `Payload::keep`
/// lives (the array, tensor capsule or buffer they belong to).
pub enum Source {
    Contiguous {
        address: *const u8,
        len: usize,
    },
    Strided {
        address: *const u8,
        itemsize: usize,
        shape: Vec<usize>,
        strides: Vec<isize>,
    },
}

pub struct Payload {
    pub source: Source,
    /// Offset in the payload area, chosen by `Encoded::place`.
    pub offset: usize,
    /// Where the offset's fixed-width varint sits in the value stream.
    pub offset_at: usize,
    pub len: usize,
    /// Held, never read: keeps the source memory alive until the copy is done.
    #[allow(dead_code)]
    pub keep: Py<PyAny>,
}

// SAFETY: the raw addresses point into memory owned by `keep`, a Python object reference
// that is Send; the copy reads them while `keep` is alive and nothing else frees it.
unsafe impl Send for Payload {}
// SAFETY: shared access only reads the description; the bytes behind it are only read.
unsafe impl Sync for Payload {}

/// A message, encoded and waiting to be copied into a frame.
pub struct Encoded {
    pub stream: Writer,
    pub payloads: Vec<Payload>,
    pub payload_len: usize,
    pub array_count: u32,
    pub flags: u16,
    /// `alloc` buffers the message references without copying (each retained once).
    pub buffers: Vec<Arc<AllocLease>>,
    /// Bytes of those buffers the message uses.
    pub alloc_bytes: usize,
}

/// Why a value could not be encoded, and where: path segments innermost first.
pub struct Failure {
    path: Vec<String>,
    message: String,
    /// Boxed: a `Failure` travels in every `Result` of the encoder, so it stays small.
    cause: Option<Box<PyErr>>,
    kind: Kind,
}

/// The exception a [`Failure`] raises.
#[derive(Clone, Copy)]
enum Kind {
    /// `EncodeError` (a `TypeError`): a value tensorslab cannot send.
    Refused,
    /// `ValueError`: a size computed from the value (an array's bytes, the message's
    /// payloads) does not fit in memory.
    OutOfRange,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            path: vec![],
            message: message.into(),
            cause: None,
            kind: Kind::Refused,
        }
    }

    fn out_of_range(message: impl Into<String>) -> Failure {
        Failure {
            kind: Kind::OutOfRange,
            ..Failure::new(message)
        }
    }

    fn at(mut self, segment: String) -> Failure {
        self.path.push(segment);
        self
    }

    /// The `EncodeError` (or `ValueError`) to raise, e.g. `msg['batch'][3].weight: cannot
    /// send ...`.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        self.into_pyerr_at(py, "msg")
    }

    /// As [`into_pyerr`](Self::into_pyerr), naming the value `root` in the path (e.g.
    /// `objs[3]` for the fourth message of a `put_many`).
    pub fn into_pyerr_at(self, py: Python<'_>, root: &str) -> PyErr {
        // Ctrl-C or `sys.exit()` inside a `__reduce__` (or any Python code the encoder ran)
        // is not a verdict on the value: it propagates as itself.
        if let Some(cause) = &self.cause {
            if !cause.is_instance_of::<PyException>(py) {
                return *self.cause.unwrap();
            }
        }
        let mut where_ = String::from(root);
        for segment in self.path.iter().rev() {
            where_.push_str(segment);
        }
        let message = format!("{where_}: {}", self.message);
        let error: PyErr = match self.kind {
            Kind::Refused => crate::error::Error::Encode(message),
            Kind::OutOfRange => crate::error::Error::InvalidArgument(message),
        }
        .into();
        if let Some(cause) = self.cause {
            error.set_cause(py, Some(*cause));
        }
        error
    }
}

impl From<PyErr> for Failure {
    fn from(error: PyErr) -> Failure {
        let message = Python::attach(|py| error.value(py).to_string());
        Failure {
            path: vec![],
            message,
            cause: Some(Box::new(error)),
            kind: Kind::Refused,
        }
    }
}

type Step = Result<(), Failure>;

/// Bytes a value stream starts with room for: a small message's whole stream.
const WRITER_CAPACITY: usize = 256;

pub struct Encoder<'py> {
    py: Python<'py>,
    types: &'py Types,
    out: Writer,
    payloads: Vec<Payload>,
    payload_len: usize,
    arrays: arrays::Seen,
    array_count: u32,
    flags: u16,
    strict: bool,
    depth: usize,
    /// Channel whose `alloc` buffers may be referenced instead of copied.
    channel_id: Option<u64>,
    buffers: Vec<Arc<AllocLease>>,
    alloc_bytes: usize,
    /// A message to another process (a channel's), not `dumps`: pickles with
    /// `multiprocessing`'s pickler (see `tensorslab/_pickling.py`).
    between_processes: bool,
}

impl<'py> Encoder<'py> {
    pub fn new(py: Python<'py>, strict: bool, channel_id: Option<u64>) -> PyResult<Encoder<'py>> {
        Ok(Encoder {
            py,
            types: types(py)?,
            out: Writer::with_capacity(WRITER_CAPACITY),
            payloads: vec![],
            payload_len: 0,
            arrays: arrays::Seen::default(),
            array_count: 0,
            flags: 0,
            strict,
            depth: 0,
            channel_id,
            buffers: vec![],
            alloc_bytes: 0,
            between_processes: false,
        })
    }

    /// For a message another process receives: what must be pickled is pickled as
    /// `multiprocessing.Queue` pickles it, so a `Connection` or a lock inside arrives usable.
    pub fn between_processes(mut self) -> Self {
        self.between_processes = true;
        self
    }

    pub fn encode(mut self, value: &Bound<'py, PyAny>) -> Result<Encoded, Failure> {
        self.value(value)?;
        Ok(Encoded {
            stream: self.out,
            payloads: self.payloads,
            payload_len: self.payload_len,
            array_count: self.array_count,
            flags: self.flags,
            buffers: self.buffers,
            alloc_bytes: self.alloc_bytes,
        })
    }

    fn value(&mut self, value: &Bound<'py, PyAny>) -> Step {
        if self.depth >= MAX_DEPTH {
            return self.pickle(value, &format!("nested deeper than {MAX_DEPTH} levels"));
        }
        self.depth += 1;
        let result = self.dispatch(value);
        self.depth -= 1;
        result
    }

    fn dispatch(&mut self, value: &Bound<'py, PyAny>) -> Step {
        let py = self.py;
        let kind = value.get_type();
        let kind = kind.as_ptr();
        macro_rules! is {
            ($t:ty) => {
                kind == py.get_type::<$t>().as_ptr()
            };
        }
        if value.is_none() {
            self.out.tag(Tag::None);
        } else if is!(PyBool) {
            self.out.tag(if value.is_truthy()? {
                Tag::True
            } else {
                Tag::False
            });
        } else if is!(PyInt) {
            self.int(value)?;
        } else if is!(PyFloat) {
            self.out.tag(Tag::Float);
            self.out
                .f64(value.cast::<PyFloat>().map_err(PyErr::from)?.value());
        } else if is!(PyString) {
            self.string(value.cast::<PyString>().map_err(PyErr::from)?)?;
        } else if is!(PyDict) {
            self.out.tag(Tag::Dict);
            self.dict(value.cast::<PyDict>().map_err(PyErr::from)?)?;
        } else if is!(PyList) {
            let list = value.cast::<PyList>().map_err(PyErr::from)?;
            self.out.tag(Tag::List);
            self.items(list.len(), list.iter())?;
        } else if is!(PyTuple) {
            let tuple = value.cast::<PyTuple>().map_err(PyErr::from)?;
            self.out.tag(Tag::Tuple);
            self.items(tuple.len(), tuple.iter())?;
        } else if is!(PyBytes) {
            self.bytes(
                value,
                value.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes(),
                false,
            )?;
        } else if is!(PyUntypedArray) {
            self.numpy(
                value,
                value.cast::<PyUntypedArray>().map_err(PyErr::from)?,
                value,
            )?;
        } else {
            self.slow(value)?;
        }
        Ok(())
    }

    /// Everything that is not an exact builtin container or scalar.
    fn slow(&mut self, value: &Bound<'py, PyAny>) -> Step {
        let py = self.py;
        let types = self.types;
        if let Some(torch) = torch_if_loaded(py)? {
            let kind = value.get_type();
            if kind.is(torch.tensor.bind(py)) {
                return self.tensor(value, ArrayKind::Torch);
            }
            if kind.is(torch.parameter.bind(py)) {
                return self.tensor(value, ArrayKind::Parameter);
            }
            if kind.is(torch.size.bind(py)) {
                let tuple = value.cast::<PyTuple>().map_err(PyErr::from)?;
                self.out.tag(Tag::TorchSize);
                self.out.uvarint(tuple.len() as u64);
                for dim in tuple.iter() {
                    self.out.ivarint(dim.extract::<i64>()?);
                }
                return Ok(());
            }
            if kind.is(torch.dtype.bind(py)) {
                let name = value.str()?.to_string();
                self.out.tag(Tag::TorchDtype);
                self.out.str(name.strip_prefix("torch.").unwrap_or(&name));
                return Ok(());
            }
            if kind.is(torch.device.bind(py)) {
                self.out.tag(Tag::TorchDevice);
                self.out.str(&value.str()?.to_string());
                return Ok(());
            }
            if value.is_instance(torch.tensor.bind(py))? {
                return self.pickle(value, "is a subclass of torch.Tensor");
            }
        }
        if value.is_instance(types.enum_type.bind(py))? {
            self.out.tag(Tag::Enum);
            self.global(&value.get_type(), value)?;
            self.out
                .str(&value.getattr(intern!(py, "name"))?.extract::<String>()?);
            return Ok(());
        }
        let kind = value.get_type();
        if kind.is(types.ordered_dict.bind(py)) || kind.is(types.counter.bind(py)) {
            let tag = if kind.is(types.counter.bind(py)) {
                Tag::Counter
            } else {
                Tag::OrderedDict
            };
            self.out.tag(tag);
            return self.dict(value.cast::<PyDict>().map_err(PyErr::from)?);
        }
        if kind.is(types.default_dict.bind(py)) {
            let factory = value.getattr(intern!(py, "default_factory"))?;
            let mark = self.out.len();
            self.out.tag(Tag::DefaultDict);
            if factory.is_none() {
                self.out.tag(Tag::None);
            } else if self.global(&factory, value).is_err() {
                self.out.truncate(mark);
                return self.pickle(value, "has a default_factory that cannot be found by name");
            }
            return self.dict(value.cast::<PyDict>().map_err(PyErr::from)?);
        }
        if let Ok(set) = value.cast_exact::<PySet>() {
            self.out.tag(Tag::Set);
            return self.items(set.len(), set.iter());
        }
        if let Ok(set) = value.cast_exact::<PyFrozenSet>() {
            self.out.tag(Tag::FrozenSet);
            return self.items(set.len(), set.iter());
        }
        if let Ok(bytes) = value.cast_exact::<PyByteArray>() {
            // SAFETY: the bytes are read at once, with the GIL held and no Python code run
            // in between, so the bytearray cannot be resized under us.
            let data = unsafe { bytes.as_bytes() }.to_vec();
            return self.bytes(value, &data, true);
        }
        if let Ok(complex) = value.cast_exact::<PyComplex>() {
            self.out.tag(Tag::Complex);
            self.out.f64(complex.real());
            self.out.f64(complex.imag());
            return Ok(());
        }
        if let Ok(tuple) = value.cast::<PyTuple>() {
            if value.hasattr(intern!(py, "_fields"))? && self.is_findable(&kind)? {
                self.out.tag(Tag::NamedTuple);
                self.global(&kind, value)?;
                return self.items(tuple.len(), tuple.iter());
            }
        }
        if kind.hasattr(intern!(py, "__dataclass_fields__"))? && self.is_findable(&kind)? {
            return self.dataclass(value, &kind);
        }
        if value.is_instance(types.np_generic.bind(py))? {
            return self.numpy_scalar(value);
        }
        if value.is_instance(types.np_dtype.bind(py))? {
            self.out.tag(Tag::NumpyDtype);
            return self.dtype(value.cast::<PyArrayDescr>().map_err(PyErr::from)?);
        }
        if value.cast::<PyUntypedArray>().is_ok() {
            // ndarray subclasses (matrix, masked arrays) carry more than their data.
            return self.pickle(value, "is a subclass of numpy.ndarray");
        }
        if value.is(PyEllipsis::get(py)) {
            self.out.tag(Tag::Ellipsis);
            return Ok(());
        }
        if let Ok(slice) = value.cast_exact::<PySlice>() {
            self.out.tag(Tag::Slice);
            for part in ["start", "stop", "step"] {
                self.value(&slice.getattr(part)?)?;
            }
            return Ok(());
        }
        if let Ok(range) = value.cast_exact::<PyRange>() {
            self.out.tag(Tag::Range);
            for part in ["start", "stop", "step"] {
                self.value(&range.getattr(part)?)?;
            }
            return Ok(());
        }
        if let Some(()) = self.datetime(value)? {
            return Ok(());
        }
        if kind.is(types.decimal.bind(py)) {
            self.out.tag(Tag::Decimal);
            self.out.str(&value.str()?.to_string());
            return Ok(());
        }
        if kind.is(types.uuid.bind(py)) {
            let bytes = value.getattr(intern!(py, "bytes"))?;
            self.out.tag(Tag::Uuid);
            self.out
                .raw(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
            return Ok(());
        }
        if value.hasattr(intern!(py, "__dlpack__"))? && !value.is_instance_of::<PyType>() {
            if let Ok(array) = types.np_from_dlpack.bind(py).call1((value,)) {
                if let Ok(untyped) = array.cast::<PyUntypedArray>() {
                    return self.numpy(&array, untyped, value);
                }
            }
        }
        self.pickle(value, "has no tensorslab encoding")
    }

    fn int(&mut self, value: &Bound<'py, PyAny>) -> Step {
        if let Ok(small) = value.extract::<i64>() {
            self.out.tag(Tag::Int);
            self.out.ivarint(small);
            return Ok(());
        }
        let py = self.py;
        let bits: usize = value.call_method0(intern!(py, "bit_length"))?.extract()?;
        let kwargs = PyDict::new(py);
        kwargs.set_item("signed", true)?;
        let bytes = value.call_method(
            intern!(py, "to_bytes"),
            (bits / 8 + 1, intern!(py, "little")),
            Some(&kwargs),
        )?;
        self.out.tag(Tag::BigInt);
        self.out
            .bytes(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
        Ok(())
    }

    fn string(&mut self, text: &Bound<'py, PyString>) -> Step {
        match text.to_cow() {
            Ok(utf8) => self.out.str_value(&utf8),
            Err(_) => {
                // Lone surrogates are valid in Python strings but not in UTF-8.
                let bytes =
                    text.call_method1(intern!(self.py, "encode"), ("utf-8", "surrogatepass"))?;
                self.out.tag(Tag::StrSurrogates);
                self.out
                    .bytes(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
            }
        }
        Ok(())
    }

    fn bytes(&mut self, owner: &Bound<'py, PyAny>, data: &[u8], bytearray: bool) -> Step {
        if data.len() <= INLINE_BYTES {
            self.out.tag(if bytearray {
                Tag::ByteArray
            } else {
                Tag::Bytes
            });
            self.out.bytes(data);
            return Ok(());
        }
        self.out.tag(Tag::BytesPayload);
        self.out.u8(u8::from(bytearray));
        let keep = if bytearray {
            PyBytes::new(self.py, data).into_any()
        } else {
            owner.clone()
        };
        let address = if bytearray {
            keep.cast::<PyBytes>()
                .map_err(PyErr::from)?
                .as_bytes()
                .as_ptr()
        } else {
            data.as_ptr()
        };
        self.push_payload(
            Source::Contiguous {
                address,
                len: data.len(),
            },
            data.len(),
            keep.unbind(),
        )
    }

    fn items<I: Iterator<Item = Bound<'py, PyAny>>>(&mut self, len: usize, items: I) -> Step {
        self.out.uvarint(len as u64);
        for (index, item) in items.enumerate() {
            self.value(&item)
                .map_err(|failure| failure.at(format!("[{index}]")))?;
        }
        Ok(())
    }

    fn dict(&mut self, dict: &Bound<'py, PyDict>) -> Step {
        self.out.uvarint(dict.len() as u64);
        for (key, value) in dict.iter() {
            let segment = || {
                format!(
                    "[{}]",
                    key.repr()
                        .map(|r| r.to_string())
                        .unwrap_or_else(|_| "?".into())
                )
            };
            self.value(&key)
                .map_err(|failure| failure.at(format!("{} (key)", segment())))?;
            self.value(&value)
                .map_err(|failure| failure.at(segment()))?;
        }
        Ok(())
    }

    /// True when `module.qualname` of `class` finds `class` again (what decoding will do).
    fn is_findable(&self, class: &Bound<'py, PyAny>) -> PyResult<bool> {
        Ok(self.lookup(class).is_ok())
    }

    fn lookup(&self, class: &Bound<'py, PyAny>) -> PyResult<(String, String)> {
        let py = self.py;
        let module: String = class.getattr(intern!(py, "__module__"))?.extract()?;
        let qualname: String = class.getattr(intern!(py, "__qualname__"))?.extract()?;
        // Classes of `__main__` are allowed: multiprocessing children alias the parent's
        // main module as `__main__`, as pickle assumes too.
        if qualname.contains("<locals>") {
            return Err(pyo3::exceptions::PyLookupError::new_err("not importable"));
        }
        let found = super::decode::find_global(py, &module, &qualname)?;
        if !found.is(class) {
            return Err(pyo3::exceptions::PyLookupError::new_err(
                "name finds another object",
            ));
        }
        Ok((module, qualname))
    }

    fn global(&mut self, class: &Bound<'py, PyAny>, owner: &Bound<'py, PyAny>) -> Step {
        let (module, qualname) = self.lookup(class).map_err(|_| {
            Failure::new(format!(
                "cannot send {} by reference: its class cannot be imported by name in another process",
                type_name(owner)
            ))
        })?;
        self.out.global(&module, &qualname);
        Ok(())
    }

    fn dataclass(&mut self, value: &Bound<'py, PyAny>, class: &Bound<'py, PyType>) -> Step {
        let py = self.py;
        let fields = self.types.dataclass_fields.bind(py).call1((value,))?;
        let fields = fields.cast::<PyTuple>().map_err(PyErr::from)?;
        self.out.tag(Tag::Dataclass);
        self.global(class.as_any(), value)?;
        self.out.uvarint(fields.len() as u64);
        for field in fields.iter() {
            let name: String = field.getattr(intern!(py, "name"))?.extract()?;
            self.out.str(&name);
            let item = value.getattr(name.as_str())?;
            self.value(&item)
                .map_err(|failure| failure.at(format!(".{name}")))?;
        }
        Ok(())
    }

    /// The pickle route (protocol 5, out-of-band buffers as payloads), or the strict error.
    fn pickle(&mut self, value: &Bound<'py, PyAny>, why: &str) -> Step {
        self.pickle_for(value, value, why)
    }

    /// [`pickle`](Encoder::pickle) of `value` sent in place of `sent` (a shared tensor's
    /// reference), with errors naming `sent`, the object the caller put.
    pub(super) fn pickle_for(
        &mut self,
        value: &Bound<'py, PyAny>,
        sent: &Bound<'py, PyAny>,
        why: &str,
    ) -> Step {
        let py = self.py;
        if self.strict {
            return Err(Failure::new(format!(
                "cannot send object of type {} without pickling (strict=True): it {why}",
                type_name(sent)
            )));
        }
        let buffers = PyList::empty(py);
        let kwargs = PyDict::new(py);
        kwargs.set_item("protocol", 5)?;
        kwargs.set_item("buffer_callback", buffers.getattr("append")?)?;
        // Shared tensors inside the pickle (a module's parameters) must stay references:
        // between processes ForkingPickler's reducer_override makes them so (`share`
        // installs it), in `dumps` the shared-aware pickler while a segment is mapped.
        let shared_dumps = if self.between_processes {
            None
        } else {
            super::share::pickle_dumps(py)?
        };
        let plain = if self.between_processes {
            &self.types.channel_pickle_dumps
        } else {
            &self.types.pickle_dumps
        };
        let data = shared_dumps
            .as_ref()
            .unwrap_or(plain.bind(py))
            .call((value,), Some(&kwargs))
            .map_err(|error| {
                let message = format!(
                    "cannot send object of type {}: it {why}, and pickling it failed: {}",
                    type_name(sent),
                    error.value(py)
                );
                Failure {
                    cause: Some(Box::new(error)),
                    ..Failure::new(message)
                }
            })?;
        self.flags |= FLAG_PICKLE;
        self.out.tag(Tag::Pickle);
        let bytes = data.cast::<PyBytes>().map_err(PyErr::from)?;
        if bytes.as_bytes().len() <= INLINE_BYTES {
            self.out.u8(0);
            self.out.bytes(bytes.as_bytes());
        } else {
            self.out.u8(1);
            let slice = bytes.as_bytes();
            self.push_payload(
                Source::Contiguous {
                    address: slice.as_ptr(),
                    len: slice.len(),
                },
                slice.len(),
                data.clone().unbind(),
            )?;
        }
        self.out.uvarint(buffers.len() as u64);
        for buffer in buffers.iter() {
            // The limited API of Python 3.9 has no buffer protocol: view the buffer as a
            // NumPy byte array to learn its address.
            let bytes = self
                .types
                .np_frombuffer
                .bind(py)
                .call1((buffer.call_method0(intern!(py, "raw"))?, "u1"))?;
            let array = bytes.cast::<PyUntypedArray>().map_err(PyErr::from)?;
            let len = array.len();
            // SAFETY: a live one-dimensional byte array; `data` is its buffer.
            let address = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
            self.push_payload(Source::Contiguous { address, len }, len, bytes.unbind())?;
        }
        Ok(())
    }
}

pub fn type_name(value: &Bound<'_, PyAny>) -> String {
    value
        .get_type()
        .fully_qualified_name()
        .map(|name| name.to_string())
        .unwrap_or_else(|_| "?".into())
}
