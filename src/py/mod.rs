//! The Python binding: converts between Python objects and the core, and decides nothing.
//! `#[pymodule]` only registers.
use pyo3::prelude::*;

mod aio;
mod alloc;
mod batch;
mod blocking;
mod decode;
mod dlpack;
mod encode;
pub(crate) mod exceptions;
mod fanout;
mod frame;
mod handles;
mod lease;
mod share;
mod types;

#[pymodule]
fn _tensorslab(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("ABI_VERSION", crate::layout::ABI_VERSION)?;
    m.add_class::<handles::Handle>()?;
    m.add_class::<handles::Sender>()?;
    m.add_class::<handles::Receiver>()?;
    m.add_class::<fanout::Publisher>()?;
    m.add_class::<fanout::Subscriber>()?;
    m.add_class::<fanout::Writer>()?;
    m.add_class::<fanout::Reader>()?;
    m.add_class::<lease::Lease>()?;
    m.add_class::<aio::AioWaker>()?;
    m.add_class::<aio::AioWatch>()?;
    m.add_function(wrap_pyfunction!(aio::_aio_serve, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_aio_after_fork_in_child, m)?)?;
    m.add_function(wrap_pyfunction!(aio::_aio_try_latest, m)?)?;
    m.add_function(wrap_pyfunction!(fanout::broadcast, m)?)?;
    m.add_function(wrap_pyfunction!(fanout::latest, m)?)?;
    m.add_function(wrap_pyfunction!(fanout::_rebuild_subscriber, m)?)?;
    m.add_function(wrap_pyfunction!(handles::channel, m)?)?;
    m.add_function(wrap_pyfunction!(handles::dumps, m)?)?;
    m.add_function(wrap_pyfunction!(handles::loads, m)?)?;
    m.add_function(wrap_pyfunction!(handles::_rebuild, m)?)?;
    m.add_function(wrap_pyfunction!(handles::_drop_ticket, m)?)?;
    m.add_function(wrap_pyfunction!(handles::_before_fork, m)?)?;
    m.add_function(wrap_pyfunction!(handles::_after_fork_in_parent, m)?)?;
    m.add_function(wrap_pyfunction!(handles::_after_fork_in_child, m)?)?;
    m.add_class::<share::SharedSegment>()?;
    m.add_function(wrap_pyfunction!(share::_share_create, m)?)?;
    m.add_function(wrap_pyfunction!(share::_share_attach, m)?)?;
    m.add_function(wrap_pyfunction!(share::_share_find, m)?)?;
    m.add_function(wrap_pyfunction!(share::_share_layout, m)?)?;
    m.add_function(wrap_pyfunction!(share::_share_live, m)?)?;
    Ok(())
}
