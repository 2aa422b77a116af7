//! Arrays, tensors, dtypes and NumPy scalars: their headers, and where their payloads go
//! (a copy into this frame, or a reference to a `Sender.alloc` buffer).
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyBytes, PyString};
use std::collections::HashMap;
use std::sync::Mutex;

use super::copy::reserve_for;
use super::{Encoder, Failure, Payload, Source, Step};
use crate::header::{
    array_nbytes, byte_strides, contiguous_strides, describe_unaddressable, python_shape,
    strided_span, ArrayKind, Location, Tag, ARRAY_REQUIRES_GRAD, MAX_BYTES,
};
use crate::py::dlpack::{self, DEVICE_CPU};
use crate::py::lease::find_alloc;
use crate::py::share::reference_for;

/// Why a shared tensor or array is pickled: its pickle is a reference, never a copy.
const SHARED_REFERENCE: &str =
    "lies in a tensorslab.share segment, and travels as a pickled reference to that memory";

/// How an array's strides were given.
pub(super) enum Strides {
    /// In bytes (NumPy).
    Bytes(Vec<isize>),
    /// In elements (DLPack).
    Elements(Vec<i64>),
    /// None given: C-contiguous (DLPack's null strides).
    Contiguous,
}

/// `value` as the `i64` the wire format writes; NumPy's sizes and offsets are `npy_intp`,
/// so this only fails for a dtype no NumPy could make.
fn wire_int(value: usize, what: &str) -> Result<i64, Failure> {
    i64::try_from(value)
        .map_err(|_| Failure::out_of_range(format!("dtype {what} of {value} does not fit in i64")))
}

/// Arrays met so far in a message, by object address, and their index (`ArrayRef`). Most
/// messages hold a few arrays: a short list searched in order, until it gets long enough
/// for a hash map to pay (a list of 2^20 arrays searched in order would be quadratic).
#[derive(Default)]
pub(super) struct Seen {
    few: Vec<(usize, u32)>,
    many: HashMap<usize, u32>,
}

impl Seen {
    const FEW: usize = 16;

    fn get(&self, key: &usize) -> Option<&u32> {
        if self.many.is_empty() {
            self.few
                .iter()
                .find(|(known, _)| known == key)
                .map(|(_, index)| index)
        } else {
            self.many.get(key)
        }
    }

    fn insert(&mut self, key: usize, index: u32) {
        if !self.many.is_empty() {
            self.many.insert(key, index);
        } else if self.few.len() < Self::FEW {
            self.few.push((key, index));
        } else {
            self.many.extend(self.few.drain(..));
            self.many.insert(key, index);
        }
    }
}

/// Plain dtypes (no fields, no subarray) whose wire text is cached, at most: a program
/// uses a handful; past this, texts are asked for each time.
const DTYPE_TEXT_LIMIT: usize = 64;

/// The wire text (`dtype.str`) of plain dtypes met before, by descriptor. `dtype.str` formats
/// a new string on every call, which was a third of the cost of encoding a small array.
/// Each entry keeps its descriptor alive, so its address never names another dtype while
/// cached; a plain descriptor's `str` (byte order, kind, item size, datetime unit) cannot
/// change. The lock is held only around the search and the insertion, never across a call
/// into Python.
type DtypeTexts = Mutex<Vec<(Py<PyArrayDescr>, Box<str>)>>;
static DTYPE_TEXTS: PyOnceLock<DtypeTexts> = PyOnceLock::new();

/// Writes the cached wire text of `dtype`, if it has one; false when it has none.
fn write_cached_dtype_text(
    py: Python<'_>,
    dtype: &Bound<'_, PyArrayDescr>,
    out: &mut crate::header::Writer,
) -> bool {
    let texts = DTYPE_TEXTS.get_or_init(py, || Mutex::new(Vec::new()));
    let texts = texts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    match texts
        .iter()
        .find(|(known, _)| known.as_ptr() == dtype.as_ptr())
    {
        Some((_, text)) => {
            out.str_value(text);
            true
        }
        None => false,
    }
}

fn cache_dtype_text(py: Python<'_>, dtype: &Bound<'_, PyArrayDescr>, text: &str) {
    let texts = DTYPE_TEXTS.get_or_init(py, || Mutex::new(Vec::new()));
    let mut texts = texts
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if texts.len() < DTYPE_TEXT_LIMIT
        && !texts
            .iter()
            .any(|(known, _)| known.as_ptr() == dtype.as_ptr())
    {
        texts.push((dtype.clone().unbind(), text.into()));
    }
}

impl<'py> Encoder<'py> {
    pub(super) fn numpy_scalar(&mut self, value: &Bound<'py, PyAny>) -> Step {
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
    pub(super) fn dtype(&mut self, dtype: &Bound<'py, PyArrayDescr>) -> Step {
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
                self.out.ivarint(wire_int(offset, "field offset")?);
            }
            self.out.tag(Tag::Int);
            self.out.ivarint(wire_int(dtype.itemsize(), "itemsize")?);
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
                self.out.ivarint(wire_int(dim, "subarray dimension")?);
            }
        } else if write_cached_dtype_text(py, dtype, &mut self.out) {
        } else {
            let text = dtype.getattr(intern!(py, "str"))?;
            let text = text.cast::<PyString>().map_err(PyErr::from)?.to_cow()?;
            self.out.str_value(&text);
            cache_dtype_text(py, dtype, &text);
        }
        Ok(())
    }

    /// Writes an `ArrayRef` and returns true when `identity` was sent before in this message.
    pub(super) fn seen(&mut self, identity: &Bound<'py, PyAny>) -> Result<bool, Failure> {
        let key = identity.as_ptr() as usize;
        if let Some(index) = self.arrays.get(&key) {
            self.out.tag(Tag::ArrayRef);
            self.out.uvarint(u64::from(*index));
            return Ok(true);
        }
        let Some(next) = self.array_count.checked_add(1) else {
            return Err(Failure::out_of_range(format!(
                "a message holds at most {} arrays and tensors",
                u32::MAX
            )));
        };
        self.arrays.insert(key, self.array_count);
        self.array_count = next;
        Ok(false)
    }

    /// `identity`: the object the user passed (for `ArrayRef`; differs from `value` when
    /// an object exporting DLPack was viewed as a NumPy array).
    pub(super) fn numpy(
        &mut self,
        value: &Bound<'py, PyAny>,
        array: &Bound<'py, PyUntypedArray>,
        identity: &Bound<'py, PyAny>,
    ) -> Step {
        let dtype = array.dtype();
        if dtype.has_object() {
            return self.pickle(value, "is a NumPy array of Python objects");
        }
        // SAFETY: `as_array_ptr` is the live array object; `data` is its buffer address.
        let address = unsafe { (*array.as_array_ptr()).fields.data } as *const u8;
        // Before `seen`: an array sent as a pickle takes no index among the message's arrays.
        if let Some(reference) = reference_for(value, Some(address as usize))? {
            return self.pickle_for(&reference, value, SHARED_REFERENCE);
        }
        if self.seen(identity)? {
            return Ok(());
        }
        let itemsize = dtype.itemsize();
        self.out.tag(Tag::Array);
        self.out.u8(ArrayKind::Numpy as u8);
        self.out.u8(0);
        self.dtype(&dtype)?;
        let shape = array.shape().to_vec();
        let strides = Strides::Bytes(array.strides().to_vec());
        self.array_body(
            "array",
            &shape,
            itemsize,
            address,
            strides,
            value.clone().unbind(),
        )
    }

    pub(super) fn tensor(&mut self, value: &Bound<'py, PyAny>, kind: ArrayKind) -> Step {
        let py = self.py;
        // Before `seen`: a tensor sent as a pickle takes no index among the message's arrays.
        if let Some(reference) = reference_for(value, None)? {
            return self.pickle_for(&reference, value, SHARED_REFERENCE);
        }
        if self.seen(value)? {
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
            // Sparse, quantized and nested tensors have no DLPack form: they travel as
            // torch.multiprocessing moves them, by torch's own reductions (the pickle's
            // bytes in the slab).
            Err(_) if !is_plain_tensor(&source)? => {
                return self.pickle(
                    value,
                    "is a sparse, quantized or nested tensor, which DLPack cannot export",
                )
            }
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
        let shape = exported
            .shape
            .iter()
            .map(|&dim| usize::try_from(dim))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| {
                Failure::out_of_range(format!(
                    "tensor exported a negative dimension through DLPack: shape {:?}",
                    exported.shape
                ))
            })?;
        let strides = match exported.strides {
            Some(strides) => Strides::Elements(strides),
            None => Strides::Contiguous,
        };
        // `dtype_name` accepted the dtype: one lane of `bits` bits.
        let itemsize = usize::from(exported.dtype.bits).div_ceil(8);
        self.array_body(
            "tensor",
            &shape,
            itemsize,
            exported.address,
            strides,
            capsule.unbind(),
        )
    }

    /// Shape and location of an array (`what`: "array" or "tensor", for errors) whose
    /// elements are at `address` with `strides`. Every size here comes from the caller's
    /// object and is checked: a torch tensor may be `expand`ed to far more bytes than
    /// memory holds, and a zero-stride view of 2^62 elements is a legitimate view.
    pub(super) fn array_body(
        &mut self,
        what: &str,
        shape: &[usize],
        itemsize: usize,
        address: *const u8,
        strides: Strides,
        keep: Py<PyAny>,
    ) -> Step {
        let Some(len) = array_nbytes(shape, itemsize) else {
            let mut message = describe_unaddressable(what, shape, itemsize);
            if !shape.contains(&0) {
                // Only a view with zero strides (`expand`, `broadcast_to`) gets this large.
                message.push_str("; send it before expanding it, and expand it after receiving");
            }
            return Err(Failure::out_of_range(message));
        };
        self.out.uvarint(shape.len() as u64);
        for dim in shape {
            self.out.uvarint(*dim as u64);
        }
        // An empty array's strides address nothing, however large they are.
        let strides = match strides {
            _ if len == 0 => None,
            Strides::Contiguous => None,
            Strides::Bytes(strides) => Some(strides),
            Strides::Elements(elements) => Some(
                byte_strides(&elements, itemsize)
                    .ok_or_else(|| strides_overflow(what, shape, &elements))?,
            ),
        };
        let strides = match strides {
            Some(strides) if !is_c_contiguous(shape, &strides, itemsize) => strides,
            // Contiguous or empty: one copy, or none at all from an `alloc` buffer.
            _ => {
                if len > 0 {
                    if let Some(location) = self.alloc_location(address, len)? {
                        self.out.location(location);
                        return Ok(());
                    }
                }
                return self.push_payload(Source::Contiguous { address, len }, len, keep);
            }
        };
        // The gather walks these strides: prove once that no offset it computes overflows.
        if strided_span(shape, &strides, itemsize).is_none() {
            return Err(strides_overflow(what, shape, &strides));
        }
        let source = Source::Strided {
            address,
            itemsize,
            shape: shape.to_vec(),
            strides,
        };
        self.push_payload(source, len, keep)
    }

    /// The location of `address..+len` inside one of this channel's `alloc` buffers.
    pub(super) fn alloc_location(
        &mut self,
        address: *const u8,
        len: usize,
    ) -> Result<Option<Location>, Failure> {
        let Some(channel_id) = self.channel_id else {
            return Ok(None);
        };
        let Some((lease, offset)) = find_alloc(channel_id, address as usize, len) else {
            return Ok(None);
        };
        // Views of one buffer may be referenced any number of times; their sum only feeds
        // statistics, but it must not wrap either.
        self.alloc_bytes = self
            .alloc_bytes
            .checked_add(len)
            .filter(|&total| total <= MAX_BYTES)
            .ok_or_else(|| {
                Failure::out_of_range(format!(
                    "the message references more than {MAX_BYTES} bytes of alloc buffers"
                ))
            })?;
        let block = lease.block();
        if !self.buffers.iter().any(|held| held.block() == block) {
            self.buffers.push(lease);
        }
        Ok(Some(Location {
            block: block.link(),
            offset: offset as u64,
            nbytes: len as u64,
        }))
    }

    /// Records a payload to copy into this frame and writes its location. The offset is a
    /// placeholder, fixed once the frame's address is known (see `Encoded::place`); the
    /// area reserves room for that placement. The area's size is summed with checks: many
    /// payloads, each addressable alone, may add up to more than any memory.
    pub(super) fn push_payload(&mut self, source: Source, len: usize, keep: Py<PyAny>) -> Step {
        let total = reserve_for(len)
            .and_then(|reserved| self.payload_len.checked_add(reserved))
            .filter(|&total| total <= MAX_BYTES);
        let Some(total) = total else {
            return Err(Failure::out_of_range(format!(
                "its {len} bytes of payload bring the message past {MAX_BYTES} bytes, \
                 more than one message can hold; send the arrays in several messages"
            )));
        };
        self.payload_len = total;
        self.out.uvarint(0);
        let offset_at = self.out.uvarint_fixed(0);
        self.out.uvarint(len as u64);
        self.payloads.push(Payload {
            source,
            offset: 0,
            offset_at,
            len,
            keep,
        });
        Ok(())
    }
}

/// An array whose strides reach offsets past `isize` (from a producer that lies about its
/// memory: real memory is smaller).
fn strides_overflow(what: &str, shape: &[usize], strides: &dyn std::fmt::Debug) -> Failure {
    Failure::out_of_range(format!(
        "{what} of shape {} has strides {strides:?} that reach past the address space",
        python_shape(shape)
    ))
}

/// Whether `strides` are the C-order strides of `shape` (ignoring axes of length 1, as
/// NumPy does). A shape whose C-order strides overflow is not contiguous.
fn is_c_contiguous(shape: &[usize], strides: &[isize], itemsize: usize) -> bool {
    let Some(expected) = contiguous_strides(shape, itemsize) else {
        return false;
    };
    shape
        .iter()
        .zip(strides.iter().zip(expected.iter()))
        .all(|(dim, (have, want))| *dim <= 1 || have == want)
}

/// A dense, strided, unquantized tensor: the kind DLPack can describe.
fn is_plain_tensor(tensor: &Bound<'_, PyAny>) -> PyResult<bool> {
    let py = tensor.py();
    let strided = tensor.getattr(intern!(py, "layout"))?.str()? == "torch.strided";
    Ok(strided
        && !tensor.getattr(intern!(py, "is_quantized"))?.is_truthy()?
        && !tensor.getattr(intern!(py, "is_nested"))?.is_truthy()?)
}
