//! The one place where core errors become Python exceptions. The classes live in
//! `tensorslab/exceptions.py` (multiple inheritance from `queue.Full`, `TypeError`,
//! ... is plain there); this module looks them up once and raises them.
use pyo3::exceptions::{PyKeyboardInterrupt, PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::PyType;

use crate::error::Error;

/// Looks up `tensorslab.exceptions.<name>`, caching the class per name.
fn class<'py>(py: Python<'py>, name: &'static str) -> PyResult<Bound<'py, PyType>> {
    static MODULE: PyOnceLock<Py<PyModule>> = PyOnceLock::new();
    let module =
        MODULE.get_or_try_init(py, || py.import("tensorslab.exceptions").map(Bound::unbind))?;
    Ok(module.bind(py).getattr(name)?.cast_into::<PyType>()?)
}

fn raise(py: Python<'_>, name: &'static str, message: String) -> PyErr {
    match class(py, name) {
        Ok(cls) => PyErr::from_type(cls, message),
        Err(err) => err,
    }
}

impl From<Error> for PyErr {
    fn from(error: Error) -> PyErr {
        Python::attach(|py| match error {
            Error::Full(m) => raise(py, "Full", m),
            Error::Empty(m) => raise(py, "Empty", m),
            Error::Closed(m) => raise(py, "Closed", m),
            Error::PeerGone(m) => raise(py, "PeerGone", m),
            Error::Limit(m) => raise(py, "LimitError", m),
            Error::HandleClosed(m) => PyValueError::new_err(m),
            Error::Interrupted => {
                PyErr::take(py).unwrap_or_else(|| PyKeyboardInterrupt::new_err("interrupted"))
            }
            // Retried without the GIL by the caller, so only a bug gets here.
            Error::WouldBlock => PyRuntimeError::new_err(
                "tensorslab internal error: a non-waiting attempt escaped its retry",
            ),
            Error::Decode(m) => raise(py, "DecodeError", m),
            Error::Encode(m) => raise(py, "EncodeError", m),
            Error::InvalidArgument(m) => PyValueError::new_err(m),
            Error::Incompatible(m) => raise(py, "IncompatibleError", m),
            error @ Error::Os { .. } => raise(py, "ShmError", error.to_string()),
        })
    }
}

/// Any ordinary exception raised while rebuilding a message (a constructor refusing a
/// corrupt value, an unhashable set item, a failing `__setstate__`) as a `DecodeError`
/// whose cause is the original; `DecodeError`s and non-`Exception`s (Ctrl-C) pass as they are.
pub fn as_decode_error(py: Python<'_>, error: PyErr) -> PyErr {
    let is_decode = class(py, "DecodeError")
        .map(|cls| error.is_instance(py, &cls))
        .unwrap_or(true);
    if is_decode || !error.is_instance_of::<pyo3::exceptions::PyException>(py) {
        return error;
    }
    let wrapped = raise(
        py,
        "DecodeError",
        format!("cannot rebuild the message: {}", error.value(py)),
    );
    wrapped.set_cause(py, Some(error));
    wrapped
}
