//! The binding of shared segments (`crate::shared`): what `tensorslab._share` builds
//! `tensorslab.share` from. A [`SharedSegment`] exports its whole mapping through DLPack as
//! one flat `uint8` tensor; the Python side views each tensor and array in it. Every view
//! holds the segment through its DLPack context, so the segment stays mapped in this process
//! while any view lives, and is unmapped (its descriptor closed) when the last one dies.
use std::sync::Arc;

use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;

use numpy::PyArrayDescr;

use super::decode::numpy_view;
use super::dlpack::{self, DLDataType, DEVICE_CPU};
use super::lease::{Keeper, Lease};
use crate::error::Error;
use crate::shared::{self, Reference, Shared};
use crate::shm::FileIdentity;

/// One process's hold on a shared segment (see `crate::shared`).
#[pyclass(frozen, module = "tensorslab._tensorslab")]
pub struct SharedSegment {
    shared: Arc<Shared>,
}

/// A reference as Python passes it: `([(pid, fd), ...], nbytes, device, inode)`.
type ReferenceTuple = (Vec<(u32, i32)>, usize, u64, u64);

#[pymethods]
impl SharedSegment {
    /// The whole segment as a flat `uint8` DLPack tensor (a "dltensor" capsule). The
    /// arguments of the DLPack protocol are accepted and ignored: the memory is on the CPU,
    /// and it is never copied (that is the point of it).
    #[pyo3(signature = (*, stream = None, max_version = None, dl_device = None, copy = None))]
    fn __dlpack__<'py>(
        &self,
        py: Python<'py>,
        stream: Option<Bound<'py, PyAny>>,
        max_version: Option<Bound<'py, PyAny>>,
        dl_device: Option<Bound<'py, PyAny>>,
        copy: Option<bool>,
    ) -> PyResult<Bound<'py, PyAny>> {
        let _ = (stream, max_version, dl_device);
        if copy == Some(true) {
            return Err(Error::InvalidArgument(
                "a shared segment is exported as itself, never copied (copy=True)".into(),
            )
            .into());
        }
        let uint8 = DLDataType {
            code: 1,
            bits: 8,
            lanes: 1,
        };
        dlpack::capsule(
            py,
            self.shared.base(),
            uint8,
            &[self.shared.len()],
            Keeper::Shared(self.shared.clone()),
        )
    }

    fn __dlpack_device__(&self) -> (i32, i32) {
        (DEVICE_CPU, 0)
    }

    /// The whole segment as a flat, writable `uint8` NumPy array (NumPy makes DLPack
    /// imports of unversioned capsules read-only), whose `base` holds the segment.
    fn array<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let base = Bound::new(py, Lease::new(Keeper::Shared(self.shared.clone())))?;
        let uint8 = PyArrayDescr::new(py, "uint8")?;
        numpy_view(
            py,
            &uint8,
            &[self.shared.len()],
            self.shared.base(),
            base.into_any(),
            true,
        )
    }

    /// Bytes mapped (a multiple of 64).
    #[getter]
    fn nbytes(&self) -> usize {
        self.shared.len()
    }

    /// Address of the mapping in this process.
    #[getter]
    fn address(&self) -> usize {
        self.shared.base() as usize
    }

    /// `([(pid, fd), ...], nbytes, device, inode)`: what `_share_attach` takes in another
    /// process. The holders are this process first, then those it knows held the segment.
    fn reference(&self) -> ReferenceTuple {
        let reference = self.shared.reference();
        (
            reference.holders,
            reference.len,
            reference.identity.device,
            reference.identity.inode,
        )
    }

    fn __repr__(&self) -> String {
        format!(
            "<tensorslab SharedSegment of {} bytes at {:#x}>",
            self.shared.len(),
            self.shared.base() as usize
        )
    }
}

/// A new shared segment of at least `nbytes` bytes (rounded up to a multiple of 64).
#[pyfunction]
pub fn _share_create(py: Python<'_>, nbytes: usize) -> PyResult<SharedSegment> {
    // The mapping without the GIL, the registering (a lock) with it: see `Shared::map_new`.
    let shared = py.detach(|| Shared::map_new(nbytes))?.register();
    Ok(SharedSegment { shared })
}

/// This process's hold on the segment a `reference()` from another process names.
#[pyfunction]
pub fn _share_attach(py: Python<'_>, reference: ReferenceTuple) -> PyResult<SharedSegment> {
    let (holders, len, device, inode) = reference;
    let reference = Reference {
        holders,
        len,
        identity: FileIdentity { device, inode },
    };
    let shared = match Shared::held(reference.identity) {
        Some(held) => held,
        None => py.detach(|| Shared::map_attached(&reference))?.register(),
    };
    Ok(SharedSegment { shared })
}

/// The segment holding `address..address + nbytes` in this process and the offset of
/// `address` in it, or None.
#[pyfunction]
pub fn _share_find(address: usize, nbytes: usize) -> Option<(SharedSegment, usize)> {
    Shared::find(address, nbytes).map(|(shared, offset)| (SharedSegment { shared }, offset))
}

/// `(offsets, nbytes)`: each of `sizes` 64-byte aligned in one segment of `nbytes`.
#[pyfunction]
pub fn _share_layout(sizes: Vec<usize>) -> PyResult<(Vec<usize>, usize)> {
    Ok(shared::layout(&sizes)?)
}

/// Shared segments this process maps now.
#[pyfunction]
pub fn _share_live() -> usize {
    shared::live()
}

/// The pickle-ready reference of `value` (a tensor or NumPy array whose elements start at
/// `address`; None: ask the tensor's `data_ptr()`) when its memory lies in a shared
/// segment, from `tensorslab._share._reference`; None otherwise. What the encoder sends
/// instead of a copy. A process that maps no shared segment pays one relaxed load; one that
/// does, a `data_ptr()` call and a registry lookup per tensor, and the Python call only for
/// a tensor that is shared.
pub(super) fn reference_for<'py>(
    value: &Bound<'py, PyAny>,
    address: Option<usize>,
) -> PyResult<Option<Bound<'py, PyAny>>> {
    static REFERENCE: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    if shared::live() == 0 {
        return Ok(None);
    }
    let py = value.py();
    let address = match address {
        Some(address) => address,
        // A tensor without storage (sparse, nested) has no data pointer: not shared.
        None => match value
            .call_method0(intern!(py, "data_ptr"))
            .and_then(|pointer| pointer.extract::<usize>())
        {
            Ok(address) => address,
            Err(_) => return Ok(None),
        },
    };
    if Shared::find(address, 0).is_none() {
        return Ok(None);
    }
    let function = REFERENCE.get_or_try_init(py, || {
        Ok::<_, PyErr>(
            py.import("tensorslab._share")?
                .getattr("_reference")?
                .unbind(),
        )
    })?;
    let found = function.bind(py).call1((value,))?;
    Ok(if found.is_none() { None } else { Some(found) })
}

/// `tensorslab._share._dumps` (`pickle.dumps` whose pickler turns shared tensors and arrays
/// into references) while this process maps a shared segment; None otherwise (plain
/// `pickle.dumps` will do).
pub(super) fn pickle_dumps(py: Python<'_>) -> PyResult<Option<Bound<'_, PyAny>>> {
    static DUMPS: PyOnceLock<Py<PyAny>> = PyOnceLock::new();
    if shared::live() == 0 {
        return Ok(None);
    }
    let dumps = DUMPS.get_or_try_init(py, || {
        Ok::<_, PyErr>(py.import("tensorslab._share")?.getattr("_dumps")?.unbind())
    })?;
    Ok(Some(dumps.bind(py).clone()))
}
