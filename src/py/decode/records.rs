//! Classes named by the data, and the records built from them: dataclasses, named tuples,
//! Enum members and defaultdict factories.
//!
//! A frame names classes by module and qualified name; this module decides what such a
//! name may resolve to and what is built from it, so that a crafted frame cannot reach
//! anything a legitimate frame would not:
//!
//! - A name resolves only to a class, and each tag accepts only its kind of class (a
//!   dataclass, a named tuple class, an Enum). Dunder components are never looked up.
//! - Untrusted data ([`Lookup::Imported`], `loads(allow_pickle=False)`) imports nothing and
//!   reads names from module and class namespaces, so no module code, module
//!   `__getattr__` or descriptor runs. Trusted data (`allow_pickle=True`, channels) imports as pickle does.
//! - A dataclass gets exactly its declared fields (`dataclasses.fields`, which is what the
//!   encoder sends), each once, through `object.__setattr__` on an instance made by
//!   `object.__new__`: no `__init__` runs, and no other attribute can be set.
//! - A named tuple gets exactly `len(_fields)` items through `tuple.__new__`; an Enum
//!   member must already exist (by name, which is what the encoder sends).
//! - A defaultdict factory is kept, not called; but the receiver calls it on every missing
//!   key, so untrusted data may only name a class whose call builds an empty value.
use std::collections::HashMap;
use std::sync::Mutex;

use pyo3::exceptions::PyException;
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::sync::PyOnceLock;
use pyo3::types::{PyModule, PyString, PyTuple, PyType};

use super::Decoder;
use crate::error::Error;
use crate::py::types::{types, Types};

/// How a `module.qualname` read from a frame is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// Import the module if needed and walk the name with `getattr`, as pickle does: for
    /// data the caller trusts (`allow_pickle=True`, channels) and for the encoder.
    Import,
    /// Only modules already in `sys.modules`, and names read from the `__dict__` of
    /// modules and classes: no module code, module `__getattr__` or descriptor runs.
    Imported,
}

fn decode_error(message: String) -> PyErr {
    Error::Decode(message).into()
}

/// `__name__`-style names: never a class a frame may name, never a field it may set.
fn is_dunder(name: &str) -> bool {
    name.len() > 4 && name.starts_with("__") && name.ends_with("__")
}

/// `a, b, c` for an error message, cut after the first ten.
fn listing<S: AsRef<str>>(names: &[S]) -> String {
    let mut text = names
        .iter()
        .take(10)
        .map(AsRef::as_ref)
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > 10 {
        text.push_str(&format!(", ... ({} in all)", names.len()));
    }
    text
}

/// `module.qualname` as trusted data finds it: imported if needed, attribute by attribute
/// (as pickle does), cached per process. The encoder checks with it that a class can be
/// found again by name.
pub fn find_global<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
) -> PyResult<Bound<'py, PyAny>> {
    lookup_global(py, module, qualname, Lookup::Import)
}

/// `module.qualname` resolved as `lookup` says, cached per process and per `lookup`.
fn lookup_global<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
    lookup: Lookup,
) -> PyResult<Bound<'py, PyAny>> {
    type Globals = Mutex<HashMap<(Lookup, String, String), Py<PyAny>>>;
    static CACHE: PyOnceLock<Globals> = PyOnceLock::new();
    let cache = CACHE.get_or_init(py, || Mutex::new(HashMap::new()));
    let key = (lookup, module.to_owned(), qualname.to_owned());
    // The lock is held only around map operations, never across a call into Python: code
    // run there could let another thread take the GIL and then wait for this lock.
    let cached = cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&key)
        .map(|found| found.clone_ref(py));
    if let Some(found) = cached {
        return Ok(found.into_bound(py));
    }
    let name = format!("{module}.{qualname}");
    if qualname.split('.').any(is_dunder) {
        return Err(decode_error(format!(
            "cannot find {name}: dunder names are not looked up"
        )));
    }
    let found = match lookup {
        Lookup::Import => import_and_getattr(py, module, qualname, &name)?,
        Lookup::Imported => read_namespaces(py, module, qualname, &name)?,
    };
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(key)
        .or_insert_with(|| found.clone().unbind());
    Ok(found)
}

fn import_and_getattr<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let missing = |error: PyErr| -> PyErr {
        // Ctrl-C or a module calling sys.exit while it is imported is not a decode error.
        if !error.is_instance_of::<PyException>(py) {
            return error;
        }
        let decode = decode_error(format!(
            "cannot find {name} in this process: {}",
            error.value(py)
        ));
        decode.set_cause(py, Some(error));
        decode
    };
    let mut found = types(py)?
        .import_module
        .bind(py)
        .call1((module,))
        .map_err(missing)?;
    for part in qualname.split('.') {
        found = found.getattr(part).map_err(missing)?;
    }
    Ok(found)
}

fn read_namespaces<'py>(
    py: Python<'py>,
    module: &str,
    qualname: &str,
    name: &str,
) -> PyResult<Bound<'py, PyAny>> {
    let mut found = types(py)?
        .sys_modules
        .bind(py)
        .get_item(module)?
        .ok_or_else(|| {
            decode_error(format!(
                "cannot find {name}: module {module} is not imported in this process, and \
                 loads(allow_pickle=False) imports nothing (importing runs the module's code); \
                 import it before loading, or pass allow_pickle=True only for data you trust"
            ))
        })?;
    let mut walked = module.to_owned();
    for part in qualname.split('.') {
        // A module's or a class's own namespace: what `getattr` finds for a class defined
        // there, without running a module `__getattr__` or a descriptor.
        let namespace = if let Ok(module) = found.cast::<PyModule>() {
            Some(module.dict().into_any())
        } else if found.is_instance_of::<PyType>() {
            Some(found.getattr(intern!(py, "__dict__"))?)
        } else {
            None
        };
        let next = match namespace {
            Some(namespace) => namespace.get_item(part).ok(),
            None => None,
        };
        found = next.ok_or_else(|| {
            decode_error(format!(
                "cannot find {name}: {walked} has no attribute {part}"
            ))
        })?;
        walked.push('.');
        walked.push_str(part);
    }
    Ok(found)
}

/// The names of `class`'s dataclass fields, in order (what the encoder sends).
fn dataclass_fields(types: &Types, class: &Bound<'_, PyType>) -> PyResult<Vec<String>> {
    let py = class.py();
    let fields = types.dataclass_fields.bind(py).call1((class,))?;
    fields
        .try_iter()?
        .map(|field| field?.getattr(intern!(py, "name"))?.extract::<String>())
        .collect()
}

/// The `_fields` of a named tuple class; `None` for any other class.
fn named_tuple_fields(class: &Bound<'_, PyType>) -> PyResult<Option<Vec<String>>> {
    if !class.is_subclass_of::<PyTuple>()? {
        return Ok(None);
    }
    let Ok(fields) = class.getattr(intern!(class.py(), "_fields")) else {
        return Ok(None);
    };
    Ok(fields.extract::<Vec<String>>().ok())
}

fn is_dataclass(class: &Bound<'_, PyType>) -> PyResult<bool> {
    class.hasattr(intern!(class.py(), "__dataclass_fields__"))
}

impl<'py> Decoder<'py, '_> {
    fn lookup(&self) -> Lookup {
        if self.allow_pickle {
            Lookup::Import
        } else {
            Lookup::Imported
        }
    }

    /// A `Global` value naming a class: the class and its name for messages.
    fn class(&mut self) -> PyResult<(Bound<'py, PyType>, String)> {
        let (module, qualname) = self.input.global()?;
        let found = lookup_global(self.py, module, qualname, self.lookup())?;
        let name = format!("{module}.{qualname}");
        match found.cast_into::<PyType>() {
            Ok(class) => Ok((class, name)),
            Err(_) => Err(decode_error(format!("{name} is not a class"))),
        }
    }

    pub(super) fn dataclass(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let (class, name) = self.class()?;
        if !is_dataclass(&class)? {
            return Err(decode_error(format!("{name} is not a dataclass")));
        }
        let fields = dataclass_fields(self.types, &class)?;
        let object = self.types.object_new.bind(py).call1((&class,))?;
        let count = self.input.count(2)?;
        let mut seen = vec![false; fields.len()];
        for _ in 0..count {
            let field = self.input.str()?;
            let position = fields.iter().position(|declared| declared == field);
            let refusal = if is_dunder(field) {
                Some(format!(
                    "refusing to set '{field}' on {name}: dunder attributes are never set"
                ))
            } else {
                match position {
                    None => Some(format!(
                        "{name} has no field '{field}' (its fields: {})",
                        listing(&fields)
                    )),
                    Some(position) if seen[position] => {
                        Some(format!("field '{field}' of {name} appears twice"))
                    }
                    Some(_) => None,
                }
            };
            let segment = || format!(".{field}");
            if let Some(refusal) = refusal {
                return Err(self.failed_at(segment(), decode_error(refusal)));
            }
            if let Some(position) = position {
                seen[position] = true;
            }
            let value = self.value_at(segment)?;
            self.types
                .object_setattr
                .bind(py)
                .call1((&object, PyString::new(py, field), value))
                .map_err(|error| self.failed_at(segment(), error))?;
        }
        let missing: Vec<&str> = fields
            .iter()
            .zip(&seen)
            .filter(|(_, seen)| !**seen)
            .map(|(field, _)| field.as_str())
            .collect();
        if !missing.is_empty() {
            let quoted: Vec<String> = missing.iter().map(|field| format!("'{field}'")).collect();
            return Err(decode_error(format!(
                "{name} is missing field{} {} (the data sets {} of {})",
                if missing.len() == 1 { "" } else { "s" },
                listing(&quoted),
                fields.len() - missing.len(),
                fields.len()
            )));
        }
        Ok(object)
    }

    pub(super) fn named_tuple(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let (class, name) = self.class()?;
        let Some(fields) = named_tuple_fields(&class)? else {
            return Err(decode_error(format!("{name} is not a named tuple class")));
        };
        let count = self.input.count(1)?;
        if count != fields.len() {
            return Err(decode_error(format!(
                "{name} has {} fields ({}) but the data has {count} items",
                fields.len(),
                listing(&fields)
            )));
        }
        let mut items = Vec::with_capacity(count);
        for index in 0..count {
            items.push(self.value_at(|| format!("[{index}]"))?);
        }
        // tuple.__new__, not the class: no constructor of the data's choosing runs.
        py.get_type::<PyTuple>()
            .call_method1(intern!(py, "__new__"), (class, PyTuple::new(py, items)?))
    }

    pub(super) fn enum_member(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        let (class, name) = self.class()?;
        if !class.is_subclass(self.types.enum_type.bind(py))? {
            return Err(decode_error(format!("{name} is not an Enum")));
        }
        let member = self.input.str()?;
        // `__members__` maps the names of existing members (aliases included) to them: a
        // lookup there can neither construct a member nor reach another attribute.
        let members = class.getattr(intern!(py, "__members__"))?;
        if let Ok(found) = members.get_item(member) {
            if found.is_instance(&class)? {
                return Ok(found);
            }
        }
        let names: Vec<String> = members
            .try_iter()?
            .map(|key| key?.extract::<String>())
            .collect::<PyResult<_>>()?;
        Err(decode_error(format!(
            "{name} has no member '{member}' (its members: {})",
            listing(&names)
        )))
    }

    /// A defaultdict's factory: `None` or a class (see the module docs for which).
    pub(super) fn default_factory(&mut self) -> PyResult<Bound<'py, PyAny>> {
        let py = self.py;
        if self.input.peek_tag()? == crate::header::Tag::None {
            self.input.tag()?;
            return Ok(py.None().into_bound(py));
        }
        let (class, name) = self.class()?;
        if !self.allow_pickle && !self.may_call(&class)? {
            return Err(decode_error(format!(
                "{name} is not a defaultdict factory loads(allow_pickle=False) calls (builtin \
                 and collections types, dataclasses and named tuples are); pass \
                 allow_pickle=True only for data you trust"
            )));
        }
        Ok(class.into_any())
    }

    /// Whether untrusted data may name `class` as a factory the receiver will call with no
    /// arguments: classes whose call builds an empty value, and records (whose `__init__`
    /// is the program's own, generated from its fields).
    fn may_call(&self, class: &Bound<'py, PyType>) -> PyResult<bool> {
        let py = self.py;
        if self
            .types
            .default_factories
            .iter()
            .any(|allowed| class.is(allowed.bind(py)))
        {
            return Ok(true);
        }
        Ok(is_dataclass(class)? || named_tuple_fields(class)?.is_some())
    }

    /// A `Global` where no class reference belongs: refused, and not looked up.
    pub(super) fn stray_global(&mut self) -> PyErr {
        match (self.input.str(), self.input.str()) {
            (Ok(module), Ok(qualname)) => decode_error(format!(
                "a class reference ({module}.{qualname}) outside a defaultdict factory"
            )),
            (Err(error), _) | (_, Err(error)) => error.into(),
        }
    }
}
