//! DLPack, the C ABI through which torch tensors enter and leave without copies or a libtorch
//! dependency. Our own `#[repr(C)]` structs (DLPack 0.8, the "dltensor" capsule every torch
//! since 1.10 speaks) rather than a crate: we need only these four structs and both
//! directions of the capsule protocol, and owning them keeps the ABI in plain view.
use std::ffi::{c_void, CStr};

use pyo3::ffi;
use pyo3::prelude::*;

use super::lease::Keeper;
use crate::error::Error;
use crate::header::contiguous_strides;

pub const CAPSULE_NAME: &CStr = c"dltensor";
pub const DEVICE_CPU: i32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

/// torch dtype names and their DLPack codes (kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4,
/// kDLComplex 5, kDLBool 6).
const DTYPES: &[(&str, u8, u8)] = &[
    ("float32", 2, 32),
    ("float64", 2, 64),
    ("float16", 2, 16),
    ("bfloat16", 4, 16),
    ("int8", 0, 8),
    ("int16", 0, 16),
    ("int32", 0, 32),
    ("int64", 0, 64),
    ("uint8", 1, 8),
    ("uint16", 1, 16),
    ("uint32", 1, 32),
    ("uint64", 1, 64),
    ("bool", 6, 8),
    ("complex64", 5, 64),
    ("complex128", 5, 128),
];

pub fn dtype_name(dtype: DLDataType) -> Option<&'static str> {
    if dtype.lanes != 1 {
        return None;
    }
    DTYPES
        .iter()
        .find(|(_, code, bits)| *code == dtype.code && *bits == dtype.bits)
        .map(|(name, _, _)| *name)
}

pub fn dtype_of(name: &str) -> Option<DLDataType> {
    DTYPES
        .iter()
        .find(|(known, _, _)| *known == name)
        .map(|(_, code, bits)| DLDataType {
            code: *code,
            bits: *bits,
            lanes: 1,
        })
}

/// A tensor exported by its owner: valid while the capsule it came from is alive. Shape
/// and strides are as the producer wrote them; the encoder checks what they imply.
pub struct Exported {
    pub address: *const u8,
    pub device_type: i32,
    pub dtype: DLDataType,
    pub shape: Vec<i64>,
    /// In elements; `None`: C-contiguous (the producer gave none).
    pub strides: Option<Vec<i64>>,
}

/// Reads the tensor behind a "dltensor" capsule without consuming it: the capsule keeps
/// the tensor alive and calls its deleter when it is freed.
pub fn read_capsule(capsule: &Bound<'_, PyAny>) -> PyResult<Exported> {
    // SAFETY: `capsule` is a live object; PyCapsule_GetPointer checks type and name and
    // returns null (with an exception set) on mismatch.
    let pointer = unsafe { ffi::PyCapsule_GetPointer(capsule.as_ptr(), CAPSULE_NAME.as_ptr()) };
    if pointer.is_null() {
        return Err(PyErr::fetch(capsule.py()));
    }
    // SAFETY: a "dltensor" capsule holds a DLManagedTensor that stays valid until its
    // deleter runs, which cannot happen while we hold a reference to the capsule.
    let tensor = unsafe { &(*pointer.cast::<DLManagedTensor>()).dl_tensor };
    let ndim = usize::try_from(tensor.ndim)
        .map_err(|_| Error::Encode("DLPack tensor with negative ndim".into()))?;
    let shape: Vec<i64> = if ndim == 0 {
        vec![]
    } else {
        // SAFETY: DLPack guarantees `shape` has `ndim` entries (and `strides` too when
        // non-null).
        unsafe { std::slice::from_raw_parts(tensor.shape, ndim) }.to_vec()
    };
    let strides = if tensor.strides.is_null() || ndim == 0 {
        None
    } else {
        // SAFETY: as above.
        Some(unsafe { std::slice::from_raw_parts(tensor.strides, ndim) }.to_vec())
    };
    let address = (tensor.data as *const u8).wrapping_add(tensor.byte_offset as usize);
    Ok(Exported {
        address,
        device_type: tensor.device.device_type,
        dtype: tensor.dtype,
        shape,
        strides,
    })
}

/// What a capsule we export owns: the DLManagedTensor first (its address is the context's),
/// then the arrays it points into and what keeps the memory alive.
#[repr(C)]
struct Context {
    managed: DLManagedTensor,
    shape: Vec<i64>,
    strides: Vec<i64>,
    _keeper: Keeper,
}

unsafe extern "C" fn delete_context(managed: *mut DLManagedTensor) {
    // SAFETY: `managed` is the first field of a Box<Context> leaked in `capsule`; the
    // consumer calls the deleter exactly once. Dropping the keeper needs no GIL.
    drop(unsafe { Box::from_raw(managed.cast::<Context>()) });
}

unsafe extern "C" fn destroy_capsule(capsule: *mut ffi::PyObject) {
    // A consumer renames the capsule to "used_dltensor" and owns the tensor from then on;
    // an unconsumed capsule still owns it and must free it.
    // SAFETY: called by Python with the capsule being destroyed (GIL held).
    unsafe {
        if ffi::PyCapsule_IsValid(capsule, CAPSULE_NAME.as_ptr()) == 1 {
            let managed =
                ffi::PyCapsule_GetPointer(capsule, CAPSULE_NAME.as_ptr()).cast::<DLManagedTensor>();
            if let Some(deleter) = (*managed).deleter {
                deleter(managed);
            }
        } else {
            ffi::PyErr_Clear();
        }
    }
}

/// A "dltensor" capsule describing C-contiguous CPU memory at `address`, kept alive by
/// `keeper` until the consumer (torch) frees it. `shape` must be one `array_nbytes`
/// accepts (so its dimensions and strides fit in `i64`); others are refused.
pub fn capsule<'py>(
    py: Python<'py>,
    address: *mut u8,
    dtype: DLDataType,
    shape: &[usize],
    keeper: Keeper,
) -> PyResult<Bound<'py, PyAny>> {
    let unaddressable = || Error::InvalidArgument(format!("shape {shape:?} does not fit DLPack"));
    let ndim = i32::try_from(shape.len()).map_err(|_| unaddressable())?;
    let dims = shape
        .iter()
        .map(|&dim| i64::try_from(dim))
        .collect::<Result<Vec<i64>, _>>()
        .map_err(|_| unaddressable())?;
    // In elements, as DLPack counts them.
    let strides = contiguous_strides(shape, 1)
        .ok_or_else(unaddressable)?
        .into_iter()
        .map(|stride| stride as i64)
        .collect();
    let mut context = Box::new(Context {
        managed: DLManagedTensor {
            dl_tensor: DLTensor {
                data: address.cast(),
                device: DLDevice {
                    device_type: DEVICE_CPU,
                    device_id: 0,
                },
                ndim,
                dtype,
                shape: std::ptr::null_mut(),
                strides: std::ptr::null_mut(),
                byte_offset: 0,
            },
            manager_ctx: std::ptr::null_mut(),
            deleter: Some(delete_context),
        },
        shape: dims,
        strides,
        _keeper: keeper,
    });
    context.managed.dl_tensor.shape = context.shape.as_mut_ptr();
    context.managed.dl_tensor.strides = context.strides.as_mut_ptr();
    let raw = Box::into_raw(context);
    // SAFETY: `raw` is a live Box<Context>; it becomes its own manager context.
    unsafe { (*raw).managed.manager_ctx = raw.cast() };
    // SAFETY: the pointer and name outlive the capsule (name is 'static); the destructor
    // frees the context unless a consumer took it over.
    let capsule =
        unsafe { ffi::PyCapsule_New(raw.cast(), CAPSULE_NAME.as_ptr(), Some(destroy_capsule)) };
    if capsule.is_null() {
        // SAFETY: the capsule was not created, so we still own the context.
        drop(unsafe { Box::from_raw(raw) });
        return Err(PyErr::fetch(py));
    }
    // SAFETY: PyCapsule_New returned a new reference.
    Ok(unsafe { Bound::from_owned_ptr(py, capsule) })
}
