//! The Python binding: converts between Python objects and the core, and decides
//! nothing. `#[pymodule]` only registers.
use pyo3::prelude::*;

pub(crate) mod exceptions;

#[pymodule]
fn _tensorslab(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
