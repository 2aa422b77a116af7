//! Arrays, tensors, dtypes and NumPy scalars: their headers, and where their payloads go
//! (a copy into this frame, or a reference to a `Sender.alloc` buffer).
use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyString};

use super::copy::reserve_for;
use super::{Encoder, Failure, Payload, Source, Step};
use crate::header::{ArrayKind, Location, Tag, ARRAY_REQUIRES_GRAD};
use crate::py::dlpack::{self, contiguous_strides, DEVICE_CPU};
use crate::py::lease::find_alloc;

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
    pub(super) fn seen(&mut self, identity: &Bound<'py, PyAny>) -> bool {
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

    pub(super) fn tensor(&mut self, value: &Bound<'py, PyAny>, kind: ArrayKind) -> Step {
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
    pub(super) fn array_body(
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
        self.push_payload(source, len, keep);
        Ok(())
    }

    /// The location of `address..+len` inside one of this channel's `alloc` buffers.
    pub(super) fn alloc_location(&mut self, address: *const u8, len: usize) -> Option<Location> {
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

    /// Records a payload to copy into this frame and writes its location. The offset is a
    /// placeholder, fixed once the frame's address is known (see `Encoded::place`); the
    /// area reserves room for that placement.
    pub(super) fn push_payload(&mut self, source: Source, len: usize, keep: Py<PyAny>) {
        self.out.uvarint(0);
        let offset_at = self.out.uvarint_fixed(0);
        self.out.uvarint(len as u64);
        self.payload_len += reserve_for(len);
        self.payloads.push(Payload {
            source,
            offset: 0,
            offset_at,
            len,
            keep,
        });
    }
}

fn is_c_contiguous(shape: &[usize], strides: &[isize], itemsize: usize) -> bool {
    let expected = contiguous_strides(shape, itemsize);
    shape
        .iter()
        .zip(strides.iter().zip(expected.iter()))
        .all(|(dim, (have, want))| *dim <= 1 || have == want)
}
