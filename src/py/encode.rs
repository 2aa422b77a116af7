//! Python value -> value stream + payload list. Runs with the GIL; copies nothing big:
//! payloads are recorded as (address, layout) and copied later, without the GIL, straight
//! into the slab block (`copy_payloads`).
//!
//! Exact builtin types are tested first (one pointer compare each), so the common message
//! of dicts, lists, numbers, strings and arrays never reaches the slower `isinstance` chain.
use std::collections::HashMap;
use std::sync::Arc;

use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{
    PyBool, PyByteArray, PyBytes, PyComplex, PyDate, PyDateAccess, PyDateTime, PyDelta,
    PyDeltaAccess, PyDict, PyEllipsis, PyFloat, PyFrozenSet, PyInt, PyList, PyRange, PySet,
    PySlice, PyString, PyTime, PyTimeAccess, PyTuple, PyType, PyTzInfoAccess,
};

use super::dlpack::{self, contiguous_strides, DEVICE_CPU};
use super::lease::{find_alloc, AllocLease};
use super::types::{torch_if_loaded, types, Types};
use crate::header::{
    align_payload, ArrayKind, Location, Tag, Writer, ARRAY_REQUIRES_GRAD, FLAG_PICKLE, MAX_DEPTH,
};

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
    pub offset: usize,
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
    cause: Option<PyErr>,
}

impl Failure {
    fn new(message: impl Into<String>) -> Failure {
        Failure {
            path: vec![],
            message: message.into(),
            cause: None,
        }
    }

    fn at(mut self, segment: String) -> Failure {
        self.path.push(segment);
        self
    }

    /// The `EncodeError` to raise, e.g. `msg['batch'][3].weight: cannot send ...`.
    pub fn into_pyerr(self, py: Python<'_>) -> PyErr {
        let mut where_ = String::from("msg");
        for segment in self.path.iter().rev() {
            where_.push_str(segment);
        }
        let error: PyErr =
            crate::error::Error::Encode(format!("{where_}: {}", self.message)).into();
        if let Some(cause) = self.cause {
            error.set_cause(py, Some(cause));
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
            cause: Some(error),
        }
    }
}

type Step = Result<(), Failure>;

pub struct Encoder<'py> {
    py: Python<'py>,
    types: &'py Types,
    out: Writer,
    payloads: Vec<Payload>,
    payload_len: usize,
    arrays: HashMap<usize, u32>,
    array_count: u32,
    flags: u16,
    strict: bool,
    depth: usize,
    /// Channel whose `alloc` buffers may be referenced instead of copied.
    channel_id: Option<u64>,
    buffers: Vec<Arc<AllocLease>>,
    alloc_bytes: usize,
}

impl<'py> Encoder<'py> {
    pub fn new(py: Python<'py>, strict: bool, channel_id: Option<u64>) -> PyResult<Encoder<'py>> {
        Ok(Encoder {
            py,
            types: types(py)?,
            out: Writer::new(),
            payloads: vec![],
            payload_len: 0,
            arrays: HashMap::new(),
            array_count: 0,
            flags: 0,
            strict,
            depth: 0,
            channel_id,
            buffers: vec![],
            alloc_bytes: 0,
        })
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
        let location = self.push_payload(
            Source::Contiguous {
                address,
                len: data.len(),
            },
            data.len(),
            keep.unbind(),
        );
        self.out.location(location);
        Ok(())
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

    fn datetime(&mut self, value: &Bound<'py, PyAny>) -> Result<Option<()>, Failure> {
        if let Ok(stamp) = value.cast_exact::<PyDateTime>() {
            self.out.tag(Tag::Datetime);
            self.out.ivarint(i64::from(stamp.get_year()));
            self.out.raw(&[
                stamp.get_month(),
                stamp.get_day(),
                stamp.get_hour(),
                stamp.get_minute(),
                stamp.get_second(),
            ]);
            self.out.uvarint(u64::from(stamp.get_microsecond()));
            self.out.u8(u8::from(stamp.get_fold()));
            self.tzinfo(stamp.get_tzinfo(), value)?;
        } else if let Ok(date) = value.cast_exact::<PyDate>() {
            self.out.tag(Tag::Date);
            self.out.ivarint(i64::from(date.get_year()));
            self.out.u8(date.get_month());
            self.out.u8(date.get_day());
        } else if let Ok(time) = value.cast_exact::<PyTime>() {
            self.out.tag(Tag::Time);
            self.out
                .raw(&[time.get_hour(), time.get_minute(), time.get_second()]);
            self.out.uvarint(u64::from(time.get_microsecond()));
            self.out.u8(u8::from(time.get_fold()));
            self.tzinfo(time.get_tzinfo(), value)?;
        } else if let Ok(delta) = value.cast_exact::<PyDelta>() {
            self.timedelta(delta);
        } else {
            return Ok(None);
        }
        Ok(Some(()))
    }

    fn timedelta(&mut self, delta: &Bound<'py, PyDelta>) {
        self.out.tag(Tag::Timedelta);
        self.out.ivarint(i64::from(delta.get_days()));
        self.out.ivarint(i64::from(delta.get_seconds()));
        self.out.ivarint(i64::from(delta.get_microseconds()));
    }

    fn tzinfo(
        &mut self,
        tz: Option<Bound<'py, pyo3::types::PyTzInfo>>,
        owner: &Bound<'py, PyAny>,
    ) -> Step {
        let py = self.py;
        let Some(tz) = tz else {
            self.out.tag(Tag::None);
            return Ok(());
        };
        let kind = tz.get_type();
        if kind.is(self.types.timezone.bind(py)) {
            let args = tz.call_method0(intern!(py, "__getinitargs__"))?;
            let args = args.cast::<PyTuple>().map_err(PyErr::from)?;
            self.out.tag(Tag::Timezone);
            let offset = args.get_item(0)?;
            self.timedelta(offset.cast::<PyDelta>().map_err(PyErr::from)?);
            match args.get_item(1) {
                Ok(name) => self.value(&name)?,
                Err(_) => self.out.tag(Tag::None),
            }
            return Ok(());
        }
        if self
            .types
            .zoneinfo
            .as_ref()
            .is_some_and(|zoneinfo| kind.is(zoneinfo.bind(py)))
        {
            let key = tz.getattr(intern!(py, "key"))?;
            if !key.is_none() {
                self.out.tag(Tag::ZoneInfo);
                self.out.str(&key.extract::<String>()?);
                return Ok(());
            }
        }
        Err(Failure::new(format!(
            "{} has a tzinfo of type {} that tensorslab cannot name",
            type_name(owner),
            type_name(tz.as_any())
        )))
    }

    fn numpy_scalar(&mut self, value: &Bound<'py, PyAny>) -> Step {
        let py = self.py;
        let dtype = value.getattr(intern!(py, "dtype"))?;
        let dtype = dtype.cast::<PyArrayDescr>().map_err(PyErr::from)?;
        if dtype.has_object() {
            return self.pickle(value, "is a NumPy object scalar");
        }
        let bytes = value.call_method0(intern!(py, "tobytes"))?;
        self.out.tag(Tag::NumpyScalar);
        self.dtype(dtype)?;
        self.out
            .bytes(bytes.cast::<PyBytes>().map_err(PyErr::from)?.as_bytes());
        Ok(())
    }

    /// A dtype value (see the wire format docs).
    fn dtype(&mut self, dtype: &Bound<'py, PyArrayDescr>) -> Step {
        let py = self.py;
        if dtype.has_fields() {
            let names = dtype.names().unwrap_or_default();
            self.out.tag(Tag::Tuple);
            self.out.uvarint(5);
            self.out.str_value("struct");
            self.out.tag(Tag::List);
            self.out.uvarint(names.len() as u64);
            for name in &names {
                self.out.str_value(name);
            }
            let mut offsets = Vec::with_capacity(names.len());
            self.out.tag(Tag::List);
            self.out.uvarint(names.len() as u64);
            for name in &names {
                let (field, offset) = dtype.get_field(name)?;
                offsets.push(offset);
                self.dtype(&field)?;
            }
            self.out.tag(Tag::List);
            self.out.uvarint(offsets.len() as u64);
            for offset in offsets {
                self.out.tag(Tag::Int);
                self.out.ivarint(offset as i64);
            }
            self.out.tag(Tag::Int);
            self.out.ivarint(dtype.itemsize() as i64);
        } else if dtype.has_subarray() {
            self.out.tag(Tag::Tuple);
            self.out.uvarint(3);
            self.out.str_value("sub");
            self.dtype(&dtype.base())?;
            let shape = dtype.shape();
            self.out.tag(Tag::Tuple);
            self.out.uvarint(shape.len() as u64);
            for dim in shape {
                self.out.tag(Tag::Int);
                self.out.ivarint(dim as i64);
            }
        } else {
            let text = dtype.getattr(intern!(py, "str"))?;
            self.out
                .str_value(&text.cast::<PyString>().map_err(PyErr::from)?.to_cow()?);
        }
        Ok(())
    }

    /// Writes an `ArrayRef` and returns true when `identity` was sent before in this message.
    fn seen(&mut self, identity: &Bound<'py, PyAny>) -> bool {
        let key = identity.as_ptr() as usize;
        if let Some(index) = self.arrays.get(&key) {
            self.out.tag(Tag::ArrayRef);
            self.out.uvarint(u64::from(*index));
            return true;
        }
        self.arrays.insert(key, self.array_count);
        self.array_count += 1;
        false
    }

    /// `identity`: the object the user passed (for `ArrayRef`; differs from `value` when
    /// an object exporting DLPack was viewed as a NumPy array).
    fn numpy(
        &mut self,
        value: &Bound<'py, PyAny>,
        array: &Bound<'py, PyUntypedArray>,
        identity: &Bound<'py, PyAny>,
    ) -> Step {
        let dtype = array.dtype();
        if dtype.has_object() {
            return self.pickle(value, "is a NumPy array of Python objects");
        }
        if self.seen(identity) {
            return Ok(());
        }
        let itemsize = dtype.itemsize();
        self.out.tag(Tag::Array);
        self.out.u8(ArrayKind::Numpy as u8);
        self.out.u8(0);
        self.dtype(&dtype)?;
        let shape = array.shape().to_vec();
        // SAFETY: `as_array_ptr` is the live array object; `data` is its buffer address.
        let address = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
        let strides = array.strides().to_vec();
        self.array_body(&shape, itemsize, address, strides, value.clone().unbind())
    }

    fn tensor(&mut self, value: &Bound<'py, PyAny>, kind: ArrayKind) -> Step {
        let py = self.py;
        if self.seen(value) {
            return Ok(());
        }
        let requires_grad = value.getattr(intern!(py, "requires_grad"))?.is_truthy()?;
        let source = if requires_grad {
            value.call_method0(intern!(py, "detach"))?
        } else {
            value.clone()
        };
        let capsule = match source.call_method0(intern!(py, "__dlpack__")) {
            Ok(capsule) => capsule,
            // Conjugate or negative views cannot be exported; materialise them first.
            Err(first) => source
                .call_method0(intern!(py, "resolve_conj"))
                .and_then(|t| t.call_method0(intern!(py, "resolve_neg")))
                .and_then(|t| t.call_method0(intern!(py, "__dlpack__")))
                .map_err(|_| first)?,
        };
        let exported = dlpack::read_capsule(&capsule)?;
        if exported.device_type != DEVICE_CPU {
            let device = value.getattr(intern!(py, "device"))?.str()?.to_string();
            return Err(Failure::new(format!(
                "cannot send a tensor on {device}: tensorslab moves CPU memory; call .cpu() first"
            )));
        }
        let Some(name) = dlpack::dtype_name(exported.dtype) else {
            return self.pickle(value, "has a dtype tensorslab cannot send without pickling");
        };
        self.out.tag(Tag::Array);
        self.out.u8(kind as u8);
        self.out.u8(if requires_grad {
            ARRAY_REQUIRES_GRAD
        } else {
            0
        });
        self.out.str_value(name);
        let itemsize = (exported.dtype.bits as usize).div_ceil(8);
        self.array_body(
            &exported.shape,
            itemsize,
            exported.address,
            exported.strides,
            capsule.unbind(),
        )
    }

    /// Shape and location of an array whose elements are at `address` with `strides`.
    fn array_body(
        &mut self,
        shape: &[usize],
        itemsize: usize,
        address: *const u8,
        strides: Vec<isize>,
        keep: Py<PyAny>,
    ) -> Step {
        self.out.uvarint(shape.len() as u64);
        for dim in shape {
            self.out.uvarint(*dim as u64);
        }
        let len = shape.iter().product::<usize>() * itemsize;
        let contiguous = len == 0 || is_c_contiguous(shape, &strides, itemsize);
        if contiguous && len > 0 {
            if let Some(location) = self.alloc_location(address, len) {
                self.out.location(location);
                return Ok(());
            }
        }
        let source = if contiguous {
            Source::Contiguous { address, len }
        } else {
            Source::Strided {
                address,
                itemsize,
                shape: shape.to_vec(),
                strides,
            }
        };
        let location = self.push_payload(source, len, keep);
        self.out.location(location);
        Ok(())
    }

    /// The location of `address..+len` inside one of this channel's `alloc` buffers.
    fn alloc_location(&mut self, address: *const u8, len: usize) -> Option<Location> {
        let channel_id = self.channel_id?;
        let (lease, offset) = find_alloc(channel_id, address as usize, len)?;
        let block = lease.block();
        if !self.buffers.iter().any(|held| held.block() == block) {
            self.buffers.push(lease);
        }
        self.alloc_bytes += len;
        Some(Location {
            block: block.link(),
            offset: offset as u64,
            nbytes: len as u64,
        })
    }

    fn push_payload(&mut self, source: Source, len: usize, keep: Py<PyAny>) -> Location {
        let offset = align_payload(self.payload_len).unwrap_or(self.payload_len);
        self.payload_len = offset + len;
        self.payloads.push(Payload {
            source,
            offset,
            keep,
        });
        Location {
            block: 0,
            offset: offset as u64,
            nbytes: len as u64,
        }
    }

    /// The pickle route (protocol 5, out-of-band buffers as payloads), or the strict error.
    fn pickle(&mut self, value: &Bound<'py, PyAny>, why: &str) -> Step {
        let py = self.py;
        if self.strict {
            return Err(Failure::new(format!(
                "cannot send object of type {} without pickling (strict=True): it {why}",
                type_name(value)
            )));
        }
        let buffers = PyList::empty(py);
        let kwargs = PyDict::new(py);
        kwargs.set_item("protocol", 5)?;
        kwargs.set_item("buffer_callback", buffers.getattr("append")?)?;
        let data = self
            .types
            .pickle_dumps
            .bind(py)
            .call((value,), Some(&kwargs))
            .map_err(|error| {
                let message = format!(
                    "cannot send object of type {}: it {why}, and pickling it failed: {}",
                    type_name(value),
                    error.value(py)
                );
                Failure {
                    path: vec![],
                    message,
                    cause: Some(error),
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
            let location = self.push_payload(
                Source::Contiguous {
                    address: slice.as_ptr(),
                    len: slice.len(),
                },
                slice.len(),
                data.clone().unbind(),
            );
            self.out.location(location);
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
            let location =
                self.push_payload(Source::Contiguous { address, len }, len, bytes.unbind());
            self.out.location(location);
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

fn is_c_contiguous(shape: &[usize], strides: &[isize], itemsize: usize) -> bool {
    let expected = contiguous_strides(shape, itemsize);
    shape
        .iter()
        .zip(strides.iter().zip(expected.iter()))
        .all(|(dim, (have, want))| *dim <= 1 || have == want)
}

/// Copies every payload into the payload area starting at `area`.
///
/// # Safety
/// `area` must be valid for writes of `encoded.payload_len` bytes, and every payload's
/// source must still be alive (its `keep` held) and not overlap `area`.
pub unsafe fn copy_payloads(payloads: &[Payload], area: *mut u8) {
    for payload in payloads {
        // SAFETY: the caller guarantees the area holds every payload's offset + len.
        let destination = unsafe { area.add(payload.offset) };
        match &payload.source {
            Source::Contiguous { address, len } => {
                // SAFETY: `address..+len` is the live source (kept by `keep`), disjoint
                // from the slab block we write.
                unsafe { std::ptr::copy_nonoverlapping(*address, destination, *len) };
            }
            Source::Strided {
                address,
                itemsize,
                shape,
                strides,
            } => {
                // SAFETY: as above; the strides describe the source array's own layout.
                unsafe { copy_strided(*address, destination, *itemsize, shape, strides) };
            }
        }
    }
}

/// Gathers a strided array into C order at `destination`.
///
/// # Safety
/// `source` with `shape`/`strides` must describe readable memory, `destination` must be
/// writable for `product(shape) * itemsize` bytes.
unsafe fn copy_strided(
    source: *const u8,
    destination: *mut u8,
    itemsize: usize,
    shape: &[usize],
    strides: &[isize],
) {
    if shape.contains(&0) {
        return;
    }
    let ndim = shape.len();
    // Innermost run that is contiguous: copy whole rows when the last axis is dense.
    let row_dense = ndim > 0 && strides[ndim - 1] == itemsize as isize;
    let (outer, row_len) = if row_dense {
        (ndim - 1, shape[ndim - 1] * itemsize)
    } else {
        (ndim, itemsize)
    };
    let mut index = vec![0usize; outer];
    let mut written = 0usize;
    loop {
        let offset: isize = index
            .iter()
            .zip(strides)
            .map(|(i, s)| *i as isize * s)
            .sum();
        // SAFETY: `offset` addresses an element (row) of the source by its own strides;
        // `written` stays below the destination's length.
        unsafe {
            std::ptr::copy_nonoverlapping(source.offset(offset), destination.add(written), row_len)
        };
        written += row_len;
        let mut axis = outer;
        loop {
            if axis == 0 {
                return;
            }
            axis -= 1;
            index[axis] += 1;
            if index[axis] < shape[axis] {
                break;
            }
            index[axis] = 0;
        }
    }
}
