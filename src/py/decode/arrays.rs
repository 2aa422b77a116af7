//! Arrays and dtypes on arrival: NumPy views over the slab held by the message's lease,
//! torch tensors through DLPack, or private copies.
use std::collections::HashMap;
use std::sync::Mutex;

use numpy::npyffi::{self, NpyTypes, PY_ARRAY_API};
use numpy::{PyArrayDescr, PyArrayDescrMethods};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyList};

use super::{corrupt, Decoder, Mode};
use crate::header::{ArrayKind, Location, Tag, ARRAY_REQUIRES_GRAD};
use crate::py::dlpack;
use crate::py::lease::{Keeper, Lease};
use crate::py::types::{torch, types};

impl<'py> Decoder<'py, '_> {
    /// A dtype value: NumPy dtypes, cached by their text.
    pub(super) fn dtype(&mut self) -> PyResult<Bound<'py, PyArrayDescr>> {
        let py = self.py;
        match self.input.peek_tag()? {
            Tag::Str => {
                let text = self.input.str_value()?;
                numpy_dtype(py, text)
            }
            Tag::Tuple => {
                self.input.tag()?;
                let parts = self.input.count(1)?;
                let kind = self.input.str_value()?;
                let np_dtype = self.types.np_dtype.bind(py);
                let dtype = match (kind, parts) {
                    ("struct", 5) => {
                        let names = self.value()?;
                        self.input.expect(Tag::List)?;
                        let count = self.input.count(1)?;
                        let formats = PyList::empty(py);
                        for _ in 0..count {
                            formats.append(self.dtype()?)?;
                        }
                        let fields = PyDict::new(py);
                        fields.set_item("names", names)?;
                        fields.set_item("formats", formats)?;
                        fields.set_item("offsets", self.value()?)?;
                        fields.set_item("itemsize", self.value()?)?;
                        np_dtype.call1((fields,))?
                    }
                    ("sub", 3) => {
                        let base = self.dtype()?;
                        np_dtype.call1(((base, self.value()?),))?
                    }
                    _ => return Err(corrupt("unknown dtype description")),
                };
                Ok(dtype.cast_into::<PyArrayDescr>().map_err(PyErr::from)?)
            }
            other => Err(corrupt(format!("expected a dtype, found {other:?}"))),
        }
    }

    pub(super) fn lease_object(&mut self) -> PyResult<Option<Bound<'py, Lease>>> {
        let Mode::View(lease) = &self.mode else {
            return Ok(None);
        };
        if self.lease_object.is_none() {
            self.lease_object = Some(Py::new(
                self.py,
                Lease::new(Keeper::Message(lease.clone())),
            )?);
        }
        Ok(self
            .lease_object
            .as_ref()
            .map(|object| object.bind(self.py).clone()))
    }

    pub(super) fn array(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let kind = self.input.u8()?;
        let kind = ArrayKind::from_byte(kind)
            .ok_or_else(|| corrupt(format!("unknown array kind {kind}")))?;
        let flags = self.input.u8()?;
        let array = if kind == ArrayKind::Numpy {
            let dtype = self.dtype()?;
            let shape = self.shape()?;
            let location = self.input.location()?;
            self.check_size(&shape, dtype.itemsize(), location)?;
            let address = self.payload(location)?;
            self.numpy_at(&dtype, &shape, address)?
        } else {
            let name = self.input.str_value()?;
            let dtype = dlpack::dtype_of(name)
                .ok_or_else(|| corrupt(format!("unknown torch dtype {name:?}")))?;
            let shape = self.shape()?;
            let location = self.input.location()?;
            self.check_size(&shape, usize::from(dtype.bits).div_ceil(8), location)?;
            let address = self.payload(location)?;
            let (keeper, address) = match &self.mode {
                Mode::View(lease) => (Keeper::Message(lease.clone()), address),
                Mode::Copy => {
                    let (keeper, copy) = Keeper::owned(location.nbytes as usize);
                    // SAFETY: both ranges are `nbytes` long (checked) and distinct.
                    unsafe {
                        std::ptr::copy_nonoverlapping(address, copy, location.nbytes as usize)
                    };
                    (keeper, copy)
                }
            };
            let torch = torch(py)?;
            let capsule = dlpack::capsule(py, address, dtype, &shape, keeper)?;
            let mut tensor = torch.from_dlpack.bind(py).call1((capsule,))?;
            let requires_grad = flags & ARRAY_REQUIRES_GRAD != 0;
            if kind == ArrayKind::Parameter {
                tensor = torch.parameter.bind(py).call1((tensor, requires_grad))?;
            } else if requires_grad {
                tensor = tensor.call_method1(intern!(py, "requires_grad_"), (true,))?;
            }
            tensor
        };
        self.arrays.push(array.clone().unbind());
        Ok(array)
    }

    pub(super) fn shape(&mut self) -> PyResult<Vec<usize>> {
        let ndim = self.input.count(1)?;
        if ndim > 64 {
            return Err(corrupt(format!("{ndim} dimensions")));
        }
        (0..ndim)
            .map(|_| self.input.size().map_err(PyErr::from))
            .collect()
    }

    pub(super) fn check_size(
        &self,
        shape: &[usize],
        itemsize: usize,
        location: Location,
    ) -> PyResult<()> {
        let len = shape
            .iter()
            .try_fold(itemsize, |acc, &dim| acc.checked_mul(dim));
        if len != Some(location.nbytes as usize) {
            return Err(corrupt(format!(
                "array of shape {shape:?} does not match its {} payload bytes",
                location.nbytes
            )));
        }
        Ok(())
    }

    /// A NumPy array of the payload at `address`: a view held by the message's lease
    /// (read-only when `readonly`), or a private copy when decoding copies.
    pub(super) fn numpy_at(
        &mut self,
        dtype: &Bound<'py, PyArrayDescr>,
        shape: &[usize],
        address: *mut u8,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self.lease_object()? {
            Some(lease) => numpy_view(
                self.py,
                dtype,
                shape,
                address,
                lease.into_any(),
                !self.readonly,
            ),
            None => self.numpy_copy(dtype, shape, address),
        }
    }

    pub(super) fn numpy_copy(
        &self,
        dtype: &Bound<'py, PyArrayDescr>,
        shape: &[usize],
        source: *const u8,
    ) -> PyResult<Bound<'py, PyAny>> {
        let array = numpy_new(self.py, dtype, shape, std::ptr::null_mut(), true)?;
        let len = shape.iter().product::<usize>() * dtype.itemsize();
        // SAFETY: a fresh C-contiguous array owns `len` bytes at `data`; the source range
        // was bounds-checked by the caller.
        unsafe {
            let data = (*array.as_ptr().cast::<npyffi::PyArrayObject>())
                .fields
                .data
                .cast::<u8>();
            std::ptr::copy_nonoverlapping(source, data, len);
        }
        Ok(array)
    }
}

/// Distinct dtype texts cached at most: the texts come from the data (`"|S1"`, `"|S2"`, ...
/// are all valid), so an unbounded cache would grow with every message a sender crafts.
const DTYPE_CACHE_LIMIT: usize = 1024;

/// Dtype texts searched in order before the hash map: a program uses a handful, and
/// comparing a few short strings costs less than hashing one.
const DTYPE_FEW: usize = 16;

#[derive(Default)]
struct DtypeCache {
    few: Vec<(Box<str>, Py<PyArrayDescr>)>,
    many: HashMap<String, Py<PyArrayDescr>>,
}

impl DtypeCache {
    fn get(&self, text: &str) -> Option<&Py<PyArrayDescr>> {
        match self.few.iter().find(|(known, _)| &**known == text) {
            Some((_, dtype)) => Some(dtype),
            None => self.many.get(text),
        }
    }

    fn insert(&mut self, text: &str, dtype: &Bound<'_, PyArrayDescr>) {
        if self.get(text).is_some() {
            return;
        }
        if self.few.len() < DTYPE_FEW {
            self.few.push((text.into(), dtype.clone().unbind()));
        } else if self.many.len() < DTYPE_CACHE_LIMIT {
            self.many.insert(text.to_owned(), dtype.clone().unbind());
        }
    }
}

/// `np.dtype(text)`, cached per process.
pub fn numpy_dtype<'py>(py: Python<'py>, text: &str) -> PyResult<Bound<'py, PyArrayDescr>> {
    static CACHE: PyOnceLock<Mutex<DtypeCache>> = PyOnceLock::new();
    let cache = CACHE.get_or_init(py, || Mutex::new(DtypeCache::default()));
    // The lock is held only around map operations, never across a call into Python: code
    // run there could let another thread take the GIL and then wait for this lock.
    let cached = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(text)
        .map(|found| found.clone_ref(py));
    if let Some(found) = cached {
        return Ok(found.into_bound(py));
    }
    let dtype = types(py)?
        .np_dtype
        .bind(py)
        .call1((text,))
        .map_err(|_| corrupt(format!("unknown NumPy dtype {text:?}")))?;
    let dtype = dtype.cast_into::<PyArrayDescr>().map_err(PyErr::from)?;
    if dtype.has_object() {
        return Err(corrupt("object dtype outside a pickle"));
    }
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(text, &dtype);
    Ok(dtype)
}

/// A C-contiguous NumPy array of `dtype` and `shape` over `data` (null: allocate).
fn numpy_new<'py>(
    py: Python<'py>,
    dtype: &Bound<'py, PyArrayDescr>,
    shape: &[usize],
    data: *mut u8,
    writable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let mut dims: Vec<npyffi::npy_intp> =
        shape.iter().map(|&dim| dim as npyffi::npy_intp).collect();
    // With `data` null NumPy allocates, and reads any nonzero flags as "Fortran order".
    let flags = match (data.is_null(), writable) {
        (true, _) => 0,
        (false, true) => npyffi::NPY_ARRAY_WRITEABLE | npyffi::NPY_ARRAY_C_CONTIGUOUS,
        (false, false) => npyffi::NPY_ARRAY_C_CONTIGUOUS,
    };
    // SAFETY: PyArray_NewFromDescr steals a reference to the descriptor (hence the incref);
    // `dims` lives across the call; with `data` non-null the caller guarantees it covers
    // the array and outlives it (through the base object set right after).
    let array = unsafe {
        pyo3::ffi::Py_INCREF(dtype.as_ptr());
        PY_ARRAY_API.PyArray_NewFromDescr(
            py,
            npyffi::get_type_object(py, NpyTypes::PyArray_Type),
            dtype.as_ptr().cast(),
            dims.len() as i32,
            dims.as_mut_ptr(),
            std::ptr::null_mut(),
            data.cast(),
            flags,
            std::ptr::null_mut(),
        )
    };
    if array.is_null() {
        return Err(PyErr::fetch(py));
    }
    // SAFETY: a new reference returned by NumPy.
    Ok(unsafe { Bound::from_owned_ptr(py, array) })
}

/// A writable NumPy view of slab memory at `data`, kept alive by `base`.
pub fn numpy_view<'py>(
    py: Python<'py>,
    dtype: &Bound<'py, PyArrayDescr>,
    shape: &[usize],
    data: *mut u8,
    base: Bound<'py, PyAny>,
    writable: bool,
) -> PyResult<Bound<'py, PyAny>> {
    let array = numpy_new(py, dtype, shape, data, writable)?;
    // SAFETY: `array` is a fresh array; SetBaseObject steals the reference we pass.
    let status =
        unsafe { PY_ARRAY_API.PyArray_SetBaseObject(py, array.as_ptr().cast(), base.into_ptr()) };
    if status != 0 {
        return Err(PyErr::fetch(py));
    }
    Ok(array)
}
