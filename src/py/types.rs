//! Python classes and functions the binding needs, looked up once per process.
//!
//! NumPy and the standard library are imported at module import; torch only when a message
//! needs it (sending a tensor means torch is loaded already; receiving one imports it).
use std::collections::HashMap;

use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyDict, PyType};

pub struct Types {
    pub ordered_dict: Py<PyType>,
    pub default_dict: Py<PyType>,
    pub counter: Py<PyType>,
    pub enum_type: Py<PyType>,
    pub decimal: Py<PyType>,
    pub uuid: Py<PyType>,
    pub timezone: Py<PyType>,
    pub zoneinfo: Option<Py<PyType>>,
    pub np_generic: Py<PyType>,
    pub np_dtype: Py<PyType>,
    pub np_from_dlpack: Py<PyAny>,
    pub np_frombuffer: Py<PyAny>,
    pub pickle_dumps: Py<PyAny>,
    /// `tensorslab._pickling.dumps`: the pickler of messages between processes.
    pub channel_pickle_dumps: Py<PyAny>,
    pub pickle_loads: Py<PyAny>,
    pub import_module: Py<PyAny>,
    pub object_new: Py<PyAny>,
    pub object_setattr: Py<PyAny>,
    pub dataclass_fields: Py<PyAny>,
    pub sys_modules: Py<PyDict>,
    /// Classes untrusted data may name as a defaultdict factory (besides dataclasses and
    /// named tuples): called with no arguments, each builds an empty value.
    pub default_factories: Vec<Py<PyType>>,
}

static TYPES: PyOnceLock<Types> = PyOnceLock::new();

fn class(py: Python<'_>, module: &str, name: &str) -> PyResult<Py<PyType>> {
    Ok(py
        .import(module)?
        .getattr(name)?
        .cast_into::<PyType>()?
        .unbind())
}

fn classes(py: Python<'_>, module: &str, names: &[&str]) -> PyResult<Vec<Py<PyType>>> {
    names.iter().map(|name| class(py, module, name)).collect()
}

fn function(py: Python<'_>, module: &str, name: &str) -> PyResult<Py<PyAny>> {
    Ok(py.import(module)?.getattr(name)?.unbind())
}

pub fn types(py: Python<'_>) -> PyResult<&Types> {
    TYPES.get_or_try_init(py, || {
        let object = py.import("builtins")?.getattr("object")?;
        Ok(Types {
            ordered_dict: class(py, "collections", "OrderedDict")?,
            default_dict: class(py, "collections", "defaultdict")?,
            counter: class(py, "collections", "Counter")?,
            enum_type: class(py, "enum", "Enum")?,
            decimal: class(py, "decimal", "Decimal")?,
            uuid: class(py, "uuid", "UUID")?,
            timezone: class(py, "datetime", "timezone")?,
            zoneinfo: class(py, "zoneinfo", "ZoneInfo").ok(),
            np_generic: class(py, "numpy", "generic")?,
            np_dtype: class(py, "numpy", "dtype")?,
            np_from_dlpack: function(py, "numpy", "from_dlpack")?,
            np_frombuffer: function(py, "numpy", "frombuffer")?,
            pickle_dumps: function(py, "pickle", "dumps")?,
            channel_pickle_dumps: function(py, "tensorslab._pickling", "dumps")?,
            pickle_loads: function(py, "pickle", "loads")?,
            import_module: function(py, "importlib", "import_module")?,
            object_new: object.getattr("__new__")?.unbind(),
            object_setattr: object.getattr("__setattr__")?.unbind(),
            dataclass_fields: function(py, "dataclasses", "fields")?,
            sys_modules: py
                .import("sys")?
                .getattr("modules")?
                .cast_into::<PyDict>()?
                .unbind(),
            default_factories: [
                classes(
                    py,
                    "builtins",
                    &[
                        "bool",
                        "int",
                        "float",
                        "complex",
                        "str",
                        "bytes",
                        "bytearray",
                        "tuple",
                        "list",
                        "dict",
                        "set",
                        "frozenset",
                    ],
                )?,
                classes(
                    py,
                    "collections",
                    &["OrderedDict", "Counter", "defaultdict", "deque"],
                )?,
            ]
            .into_iter()
            .flatten()
            .collect(),
        })
    })
}

pub struct Torch {
    pub tensor: Py<PyType>,
    pub parameter: Py<PyType>,
    pub size: Py<PyType>,
    pub dtype: Py<PyType>,
    pub device: Py<PyType>,
    pub from_dlpack: Py<PyAny>,
    /// Every name torch's namespace binds to a dtype (`float32`, `float`, `bfloat16`, ...),
    /// read once. Looking a message's dtype name up here runs no Python code (`getattr` on
    /// torch would run its module `__getattr__`, which imports modules and calls functions
    /// for some names) and takes no lock (a Rust lock held while Python code runs can
    /// deadlock with a thread that holds the GIL and waits for the lock).
    dtypes: HashMap<String, Py<PyAny>>,
}

static TORCH: PyOnceLock<Torch> = PyOnceLock::new();

impl Torch {
    fn load(py: Python<'_>) -> PyResult<Torch> {
        let torch = py.import("torch")?;
        let dtype = torch.getattr("dtype")?.cast_into::<PyType>()?;
        let mut dtypes = HashMap::new();
        for (name, value) in torch.dict().iter() {
            if value.is_exact_instance(&dtype) {
                if let Ok(name) = name.extract::<String>() {
                    dtypes.insert(name, value.unbind());
                }
            }
        }
        Ok(Torch {
            tensor: torch.getattr("Tensor")?.cast_into::<PyType>()?.unbind(),
            parameter: class(py, "torch.nn", "Parameter")?,
            size: torch.getattr("Size")?.cast_into::<PyType>()?.unbind(),
            dtype: dtype.unbind(),
            device: torch.getattr("device")?.cast_into::<PyType>()?.unbind(),
            from_dlpack: torch.getattr("_C")?.getattr("_from_dlpack")?.unbind(),
            dtypes,
        })
    }

    /// `torch.<name>` for a dtype name read from a message, if torch has such a dtype.
    pub fn dtype_named<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Bound<'py, PyAny>> {
        let dtype = self.dtypes.get(name).ok_or_else(|| {
            crate::error::Error::Decode(format!(
                "torch has no dtype '{name}' (a newer torch sent it?)"
            ))
        })?;
        Ok(dtype.bind(py).clone())
    }
}

/// torch, importing it on first use (receiving a tensor).
pub fn torch(py: Python<'_>) -> PyResult<&Torch> {
    TORCH.get_or_try_init(py, || Torch::load(py))
}

/// torch if this process has imported it; never imports it (sending code without torch
/// must not pay for importing it).
pub fn torch_if_loaded(py: Python<'_>) -> PyResult<Option<&Torch>> {
    if let Some(torch) = TORCH.get(py) {
        return Ok(Some(torch));
    }
    if types(py)?.sys_modules.bind(py).contains("torch")? {
        return torch(py).map(Some);
    }
    Ok(None)
}
