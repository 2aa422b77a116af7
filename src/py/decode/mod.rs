//! Value stream -> Python value. Arrays become zero-copy views of the slab (held by the
//! message's lease) or, in copy mode (`get(copy=True)`, `loads`), private copies.
//!
//! Everything read from the frame is untrusted: the stream is a private copy (see
//! `FrameHeader::copy_from_shared`) that the `Reader` bounds-checks, `payload` checks every
//! location against its block (which must be one the frame holds), and classes named in
//! the stream are resolved and used only as `records.rs` allows (the kind their tag says,
//! declared fields only, no imports for untrusted data), so a crafted frame cannot call
//! arbitrary functions or set arbitrary state. Pickles are refused unless allowed.
//!
//! A failure names where it happened, as `msg['batch'][3].weight: ...`: each container
//! adds its segment to `path` as the error passes through it, so the path costs nothing
//! until something fails.
//!
//! Arrays and dtypes are rebuilt in `arrays.rs`; records (dataclasses, named tuples, Enum
//! members, defaultdict factories) in `records.rs`.
use std::sync::Arc;

use numpy::PyArrayDescrMethods;
use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyByteArray, PyBytes, PyComplex, PyDate, PyDateTime, PyDelta, PyDict, PyFrozenSet, PyList,
    PySet, PySlice, PyString, PyTime, PyTuple, PyTzInfo,
};

mod arrays;
mod records;

pub use arrays::{numpy_dtype, numpy_view};
pub use records::find_global;

use super::exceptions::as_decode_error;
use super::lease::{Lease, MessageLease};
use super::types::{torch, types, Types};
use crate::channel::Channel;
use crate::error::Error;
use crate::header::{payload_range, Location, Reader, Tag};
use crate::slab::SlabRef;

/// Where array memory comes from on arrival.
pub enum Mode {
    /// Views of the slab, held by this lease.
    View(Arc<MessageLease>),
    /// Private copies.
    Copy,
}

pub struct Decoder<'py, 'a> {
    py: Python<'py>,
    types: &'py Types,
    input: Reader<'a>,
    /// This frame's payload area.
    area: &'a [u8],
    /// The `alloc` blocks the frame holds (listed at the start of its stream): the only
    /// slab blocks its locations may name.
    blocks: &'a [SlabRef],
    mode: Mode,
    /// The `Lease` object shared as `base` by NumPy views of this message.
    lease_object: Option<Py<Lease>>,
    /// NumPy views are made read-only (a broadcast's readers share the memory).
    pub readonly: bool,
    channel: Option<&'a Channel>,
    allow_pickle: bool,
    arrays: Vec<Py<PyAny>>,
    /// Where the error being returned happened, innermost segment first (`.weight`, `[3]`).
    path: Vec<String>,
    /// Bytes of `alloc` buffers the message referenced (they are part of what it moved).
    pub external_bytes: std::cell::Cell<u64>,
}

fn corrupt(what: impl Into<String>) -> PyErr {
    Error::Decode(format!("corrupt message: {}", what.into())).into()
}

impl<'py, 'a> Decoder<'py, 'a> {
    pub fn new(
        py: Python<'py>,
        input: Reader<'a>,
        area: &'a [u8],
        blocks: &'a [SlabRef],
        mode: Mode,
        channel: Option<&'a Channel>,
        allow_pickle: bool,
    ) -> PyResult<Decoder<'py, 'a>> {
        Ok(Decoder {
            py,
            types: types(py)?,
            input,
            area,
            blocks,
            mode,
            lease_object: None,
            readonly: false,
            channel,
            allow_pickle,
            arrays: vec![],
            path: vec![],
            external_bytes: std::cell::Cell::new(0),
        })
    }

    /// Decodes the message (the stream's one value) and checks nothing trails it.
    pub fn message(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let value = self
            .value()
            .map_err(|error| self.located(as_decode_error(py, error)))?;
        if !self.input.is_at_end() {
            return Err(corrupt(format!(
                "{} bytes after the value",
                self.input.remaining()
            )));
        }
        Ok(value)
    }

    fn value(&mut self) -> PyResult<Bound<'py, PyAny>> {
        self.input.enter()?;
        let value = self.body();
        self.input.leave();
        value
    }

    /// The next value; if it fails, `segment` (where it sits in its container) joins the
    /// error's path.
    fn value_at(&mut self, segment: impl FnOnce() -> String) -> PyResult<Bound<'py, PyAny>> {
        self.value()
            .map_err(|error| self.failed_at(segment(), error))
    }

    fn failed_at(&mut self, segment: String, error: PyErr) -> PyErr {
        self.path.push(segment);
        error
    }

    /// The `DecodeError` to raise, its message prefixed with the path of the failure, as
    /// `msg['batch'][3].weight: ...`. Ctrl-C and other non-`Exception`s pass unchanged.
    fn located(&self, error: PyErr) -> PyErr {
        let py = self.py;
        if !error.is_instance_of::<PyException>(py) {
            return error;
        }
        let mut where_ = String::from("msg");
        for segment in self.path.iter().rev() {
            where_.push_str(segment);
        }
        let located: PyErr = Error::Decode(format!("{where_}: {}", error.value(py))).into();
        located.set_cause(py, error.cause(py));
        located
    }

    fn items(&mut self) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let count = self.input.count(1)?;
        let mut items = Vec::with_capacity(count);
        for index in 0..count {
            items.push(self.value_at(|| format!("[{index}]"))?);
        }
        Ok(items)
    }

    fn dict_into(&mut self, dict: &Bound<'py, PyAny>) -> PyResult<()> {
        let count = self.input.count(2)?;
        for index in 0..count {
            let key = self.value_at(|| format!(".keys()[{index}]"))?;
            let value = self.value_at(|| key_segment(&key))?;
            dict.set_item(&key, value)
                .map_err(|error| self.failed_at(key_segment(&key), error))?;
        }
        Ok(())
    }

    fn body(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let tag = self.input.tag()?;
        Ok(match tag {
            Tag::None => py.None().into_bound(py),
            Tag::False => false.into_pyobject(py)?.to_owned().into_any(),
            Tag::True => true.into_pyobject(py)?.to_owned().into_any(),
            Tag::Ellipsis => py.Ellipsis().into_bound(py),
            Tag::Int => self.input.ivarint()?.into_pyobject(py)?.into_any(),
            Tag::BigInt => {
                let bytes = PyBytes::new(py, self.input.bytes()?);
                let kwargs = PyDict::new(py);
                kwargs.set_item("signed", true)?;
                py.get_type::<pyo3::types::PyInt>().call_method(
                    "from_bytes",
                    (bytes, "little"),
                    Some(&kwargs),
                )?
            }
            Tag::Float => self.input.f64()?.into_pyobject(py)?.into_any(),
            Tag::Complex => {
                PyComplex::from_doubles(py, self.input.f64()?, self.input.f64()?).into_any()
            }
            Tag::Str => PyString::new(py, self.input.str()?).into_any(),
            Tag::StrSurrogates => {
                let bytes = PyBytes::new(py, self.input.bytes()?);
                bytes
                    .call_method1(intern!(py, "decode"), ("utf-8", "surrogatepass"))
                    .map_err(|_| corrupt("bad surrogate string"))?
            }
            Tag::Bytes => PyBytes::new(py, self.input.bytes()?).into_any(),
            Tag::ByteArray => PyByteArray::new(py, self.input.bytes()?).into_any(),
            Tag::BytesPayload => {
                let bytearray = self.input.u8()? != 0;
                let location = self.input.location()?;
                let data = self.payload(location)?;
                // SAFETY: `payload` checked the range lies in live, mapped memory.
                let slice = unsafe { std::slice::from_raw_parts(data, location.nbytes as usize) };
                if bytearray {
                    PyByteArray::new(py, slice).into_any()
                } else {
                    PyBytes::new(py, slice).into_any()
                }
            }
            Tag::Tuple => PyTuple::new(py, self.items()?)?.into_any(),
            Tag::List => PyList::new(py, self.items()?)?.into_any(),
            Tag::Set => PySet::new(py, self.items()?)?.into_any(),
            Tag::FrozenSet => PyFrozenSet::new(py, self.items()?)?.into_any(),
            Tag::Dict => {
                let dict = PyDict::new(py).into_any();
                self.dict_into(&dict)?;
                dict
            }
            Tag::OrderedDict | Tag::Counter => {
                let class = if tag == Tag::Counter {
                    &self.types.counter
                } else {
                    &self.types.ordered_dict
                };
                let dict = class.bind(py).call0()?;
                self.dict_into(&dict)?;
                dict
            }
            Tag::DefaultDict => {
                let factory = self
                    .default_factory()
                    .map_err(|error| self.failed_at(".default_factory".into(), error))?;
                let dict = self.types.default_dict.bind(py).call1((factory,))?;
                self.dict_into(&dict)?;
                dict
            }
            Tag::Global => return Err(self.stray_global()),
            Tag::NamedTuple => self.named_tuple()?,
            Tag::Dataclass => self.dataclass()?,
            Tag::Enum => self.enum_member()?,
            Tag::Array => self.array()?,
            Tag::ArrayRef => {
                let index = self.input.size()?;
                let array = self.arrays.get(index).ok_or_else(|| {
                    corrupt(format!(
                        "reference to array {index}, which came before no array"
                    ))
                })?;
                array.bind(py).clone()
            }
            Tag::NumpyDtype => self.dtype()?.into_any(),
            Tag::NumpyScalar => {
                let dtype = self.dtype()?;
                let bytes = self.input.bytes()?;
                if bytes.len() != dtype.itemsize() {
                    return Err(corrupt("NumPy scalar of the wrong size"));
                }
                let array = self.numpy_copy(&dtype, &[], bytes.as_ptr())?;
                array.get_item(())?
            }
            Tag::TorchDtype => {
                let name = self.input.str()?;
                torch(py)?.dtype_named(py, name)?
            }
            Tag::TorchDevice => {
                let name = PyString::new(py, self.input.str()?);
                torch(py)?.device.bind(py).call1((name,))?
            }
            Tag::TorchSize => {
                let count = self.input.count(1)?;
                let dims = (0..count)
                    .map(|_| self.input.ivarint())
                    .collect::<Result<Vec<_>, _>>()?;
                torch(py)?.size.bind(py).call1((PyTuple::new(py, dims)?,))?
            }
            Tag::Slice | Tag::Range => {
                let start = self.value_at(|| ".start".into())?;
                let stop = self.value_at(|| ".stop".into())?;
                let step = self.value_at(|| ".step".into())?;
                if tag == Tag::Slice {
                    py.get_type::<PySlice>().call1((start, stop, step))?
                } else {
                    py.get_type::<pyo3::types::PyRange>()
                        .call1((start, stop, step))?
                }
            }
            Tag::Datetime => {
                let year = i32::try_from(self.input.ivarint()?)
                    .map_err(|_| corrupt("year out of range"))?;
                let f = self.input.take(5)?;
                let (month, day, hour, minute, second) = (f[0], f[1], f[2], f[3], f[4]);
                let micro = u32::try_from(self.input.uvarint()?)
                    .map_err(|_| corrupt("microsecond out of range"))?;
                let fold = self.input.u8()? != 0;
                let tz = self.tzinfo()?;
                PyDateTime::new_with_fold(
                    py,
                    year,
                    month,
                    day,
                    hour,
                    minute,
                    second,
                    micro,
                    tz.as_ref(),
                    fold,
                )?
                .into_any()
            }
            Tag::Date => {
                let year = i32::try_from(self.input.ivarint()?)
                    .map_err(|_| corrupt("year out of range"))?;
                PyDate::new(py, year, self.input.u8()?, self.input.u8()?)?.into_any()
            }
            Tag::Time => {
                let f = self.input.take(3)?;
                let (hour, minute, second) = (f[0], f[1], f[2]);
                let micro = u32::try_from(self.input.uvarint()?)
                    .map_err(|_| corrupt("microsecond out of range"))?;
                let fold = self.input.u8()? != 0;
                let tz = self.tzinfo()?;
                PyTime::new_with_fold(py, hour, minute, second, micro, tz.as_ref(), fold)?
                    .into_any()
            }
            Tag::Timedelta => self.timedelta()?.into_any(),
            Tag::Timezone | Tag::ZoneInfo => self.tzinfo_body(tag)?.into_any(),
            Tag::Decimal => self.types.decimal.bind(py).call1((self.input.str()?,))?,
            Tag::Uuid => {
                let bytes = PyBytes::new(py, self.input.take(16)?);
                let kwargs = PyDict::new(py);
                kwargs.set_item("bytes", bytes)?;
                self.types.uuid.bind(py).call((), Some(&kwargs))?
            }
            Tag::Pickle => self.pickle()?,
        })
    }

    fn timedelta(&mut self) -> PyResult<Bound<'py, PyDelta>> {
        let mut part = || -> PyResult<i32> {
            let value = self.input.ivarint()?;
            i32::try_from(value).map_err(|_| corrupt("timedelta out of range"))
        };
        let (days, seconds, micros) = (part()?, part()?, part()?);
        PyDelta::new(self.py, days, seconds, micros, true)
    }

    fn tzinfo(&mut self) -> PyResult<Option<Bound<'py, PyTzInfo>>> {
        match self.input.tag()? {
            Tag::None => Ok(None),
            tag => self.tzinfo_body(tag).map(Some),
        }
    }

    fn tzinfo_body(&mut self, tag: Tag) -> PyResult<Bound<'py, PyTzInfo>> {
        let py = self.py;
        match tag {
            Tag::Timezone => {
                self.input.expect(Tag::Timedelta)?;
                let offset = self.timedelta()?;
                let name = self.value()?;
                let zone = if name.is_none() {
                    self.types.timezone.bind(py).call1((offset,))?
                } else {
                    self.types.timezone.bind(py).call1((offset, name))?
                };
                Ok(zone.cast_into::<PyTzInfo>().map_err(PyErr::from)?)
            }
            Tag::ZoneInfo => {
                let key = self.input.str()?;
                let zoneinfo = self
                    .types
                    .zoneinfo
                    .as_ref()
                    .ok_or_else(|| corrupt("zoneinfo is not available here"))?;
                let zone = zoneinfo.bind(py).call1((key,))?;
                Ok(zone.cast_into::<PyTzInfo>().map_err(PyErr::from)?)
            }
            other => Err(corrupt(format!("expected a time zone, found {other:?}"))),
        }
    }

    /// Address of a payload, after checking it lies inside its block: this frame's
    /// payload area, or an `alloc` block the frame holds (so the message's lease keeps it
    /// alive for as long as the views made here).
    fn payload(&self, location: Location) -> PyResult<*mut u8> {
        if location.block == 0 {
            let range = payload_range(location, self.area.len() as u64)?;
            return Ok(self.area[range].as_ptr().cast_mut());
        }
        let channel = self
            .channel
            .ok_or_else(|| corrupt("reference to a slab block outside a channel"))?;
        let block = SlabRef::from_link(location.block).ok_or_else(|| corrupt("slab block 0"))?;
        if !self.blocks.contains(&block) {
            return Err(corrupt(format!(
                "payload in slab block {:#x}, which the message does not hold",
                block.0
            )));
        }
        let (header, address, capacity) = channel.slab().content(block)?;
        // Read once and kept within the block: another process may change it meanwhile.
        let len = header
            .content_len
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(capacity as u64);
        let range = payload_range(location, len)?;
        self.external_bytes
            .set(self.external_bytes.get() + location.nbytes);
        // SAFETY: `content` checked the block lies in its mapped segment; the range lies
        // within its content (checked just above).
        Ok(unsafe { address.add(range.start) })
    }

    fn pickle(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if !self.allow_pickle {
            return Err(Error::Decode(
                "the data holds a pickled object; pass allow_pickle=True to load it (only for data you trust: unpickling can run any code)".into(),
            )
            .into());
        }
        let data = match self.input.u8()? {
            0 => PyBytes::new(py, self.input.bytes()?),
            1 => {
                let location = self.input.location()?;
                let address = self.payload(location)?;
                // SAFETY: bounds-checked by `payload`.
                PyBytes::new(py, unsafe {
                    std::slice::from_raw_parts(address, location.nbytes as usize)
                })
            }
            other => return Err(corrupt(format!("unknown pickle storage {other}"))),
        };
        let count = self.input.count(3)?;
        let buffers = PyList::empty(py);
        for _ in 0..count {
            let location = self.input.location()?;
            let address = self.payload(location)?;
            let dtype = numpy_dtype(py, "|u1")?;
            let shape = [location.nbytes as usize];
            let buffer = self.numpy_at(&dtype, &shape, address)?;
            buffers.append(buffer)?;
        }
        let kwargs = PyDict::new(py);
        kwargs.set_item("buffers", buffers)?;
        self.types
            .pickle_loads
            .bind(py)
            .call((data,), Some(&kwargs))
    }
}

/// `[key]` for an error path: the key's repr, cut short.
fn key_segment(key: &Bound<'_, PyAny>) -> String {
    let text = key
        .repr()
        .map(|repr| repr.to_string())
        .unwrap_or_else(|_| "?".into());
    match text.char_indices().nth(40) {
        Some((cut, _)) => format!("[{}...]", &text[..cut]),
        None => format!("[{text}]"),
    }
}
