//! Value stream -> Python value. Arrays become zero-copy views of the slab (held by the
//! message's lease) or, in copy mode (`get(copy=True)`, `loads`), private copies.
//!
//! Everything read from the frame is untrusted: the `Reader` bounds-checks the stream,
//! `payload` bounds-checks every location, and classes named in the stream are only used
//! as the kind of object their tag says (a named tuple class must be a tuple subclass with
//! `_fields`, ...) so a crafted frame cannot call arbitrary functions. Pickles are refused
//! unless allowed.
//!
//! Arrays and dtypes are rebuilt in `arrays.rs`.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use numpy::PyArrayDescrMethods;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{
    PyByteArray, PyBytes, PyComplex, PyDate, PyDateTime, PyDelta, PyDict, PyFrozenSet, PyList,
    PySet, PySlice, PyString, PyTime, PyTuple, PyType, PyTzInfo,
};

mod arrays;

pub use arrays::{numpy_dtype, numpy_view};

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
    mode: Mode,
    /// The `Lease` object shared as `base` by NumPy views of this message.
    lease_object: Option<Py<Lease>>,
    channel: Option<&'a Channel>,
    allow_pickle: bool,
    arrays: Vec<Py<PyAny>>,
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
        mode: Mode,
        channel: Option<&'a Channel>,
        allow_pickle: bool,
    ) -> PyResult<Decoder<'py, 'a>> {
        Ok(Decoder {
            py,
            types: types(py)?,
            input,
            area,
            mode,
            lease_object: None,
            channel,
            allow_pickle,
            arrays: vec![],
            external_bytes: std::cell::Cell::new(0),
        })
    }

    /// Decodes the message (the stream's one value) and checks nothing trails it.
    pub fn message(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let value = self.value().map_err(|error| as_decode_error(py, error))?;
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

    fn items(&mut self) -> PyResult<Vec<Bound<'py, PyAny>>> {
        let count = self.input.count(1)?;
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(self.value()?);
        }
        Ok(items)
    }

    fn dict_into(&mut self, dict: &Bound<'py, PyAny>) -> PyResult<()> {
        let count = self.input.count(2)?;
        for _ in 0..count {
            let key = self.value()?;
            let value = self.value()?;
            dict.set_item(key, value)?;
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
                let count = self.input.count(2)?;
                let dict = PyDict::new(py);
                for _ in 0..count {
                    let key = self.value()?;
                    dict.set_item(key, self.value()?)?;
                }
                dict.into_any()
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
                let factory = self.value()?;
                if !factory.is_none() && !factory.is_instance_of::<PyType>() {
                    return Err(corrupt("defaultdict factory is not a class"));
                }
                let dict = self.types.default_dict.bind(py).call1((factory,))?;
                self.dict_into(&dict)?;
                dict
            }
            Tag::Global => {
                let (module, qualname) = (self.input.str()?, self.input.str()?);
                let found = find_global(py, module, qualname)?;
                if !found.is_instance_of::<PyType>() {
                    return Err(corrupt(format!("{module}.{qualname} is not a class")));
                }
                found
            }
            Tag::NamedTuple => {
                let class = self.class()?;
                if !class.is_subclass_of::<PyTuple>()? || !class.hasattr(intern!(py, "_fields"))? {
                    return Err(corrupt(format!("{} is not a named tuple class", class)));
                }
                let items = PyTuple::new(py, self.items()?)?;
                py.get_type::<PyTuple>()
                    .call_method1(intern!(py, "__new__"), (class, items))?
            }
            Tag::Dataclass => {
                let class = self.class()?;
                if !class.hasattr(intern!(py, "__dataclass_fields__"))? {
                    return Err(corrupt(format!("{} is not a dataclass", class)));
                }
                let object = self.types.object_new.bind(py).call1((&class,))?;
                let count = self.input.count(2)?;
                for _ in 0..count {
                    let name = PyString::new(py, self.input.str()?);
                    let value = self.value()?;
                    self.types
                        .object_setattr
                        .bind(py)
                        .call1((&object, name, value))?;
                }
                object
            }
            Tag::Enum => {
                let class = self.class()?;
                if !class.is_subclass(self.types.enum_type.bind(py))? {
                    return Err(corrupt(format!("{} is not an Enum", class)));
                }
                class.get_item(self.input.str()?)?
            }
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
                let (start, stop, step) = (self.value()?, self.value()?, self.value()?);
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

    fn class(&mut self) -> PyResult<Bound<'py, PyType>> {
        let (module, qualname) = self.input.global()?;
        let found = find_global(self.py, module, qualname)?;
        found
            .cast_into::<PyType>()
            .map_err(|_| corrupt(format!("{module}.{qualname} is not a class")))
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

    /// Address of a payload, after checking it lies inside its block.
    fn payload(&self, location: Location) -> PyResult<*mut u8> {
        if location.block == 0 {
            let range = payload_range(location, self.area.len() as u64)?;
            return Ok(self.area[range].as_ptr().cast_mut());
        }
        let channel = self
            .channel
            .ok_or_else(|| corrupt("reference to a slab block outside a channel"))?;
        let block = SlabRef::from_link(location.block).ok_or_else(|| corrupt("slab block 0"))?;
        let (header, address, _) = channel.slab().content(block)?;
        let len = header
            .content_len
            .load(std::sync::atomic::Ordering::Relaxed);
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
            let buffer = match self.lease_object()? {
                Some(lease) => numpy_view(py, &dtype, &shape, address, lease.into_any())?,
                None => self.numpy_copy(&dtype, &shape, address)?,
            };
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

/// `module.qualname`, imported and looked up attribute by attribute (as pickle does),
/// cached per process.
pub fn find_global<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
) -> PyResult<Bound<'py, PyAny>> {
    type Globals = Mutex<HashMap<(String, String), Py<PyAny>>>;
    static CACHE: PyOnceLock<Globals> = PyOnceLock::new();
    let cache = CACHE.get_or_init(py, || Mutex::new(HashMap::new()));
    let key = (module.to_owned(), qualname.to_owned());
    if let Some(found) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&key) {
        return Ok(found.bind(py).clone());
    }
    let missing = |error: PyErr| -> PyErr {
        let message = format!(
            "cannot find {module}.{qualname} in this process: {}",
            error.value(py)
        );
        let decode: PyErr = Error::Decode(message).into();
        decode.set_cause(py, Some(error));
        decode
    };
    let mut found = types(py)?
        .import_module
        .bind(py)
        .call1((module,))
        .map_err(missing)?;
    for part in qualname.split('.') {
        found = found.getattr(part).map_err(missing)?;
    }
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(key, found.clone().unbind());
    Ok(found)
}
