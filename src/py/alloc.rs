//! `Sender.alloc` and `Sender.alloc_like`: uninitialised arrays and tensors in slab memory,
//! one alone or a whole nested structure of them (a *chunk*) in one `alloc` block.
//!
//! Every leaf of a chunk lies in the same block at its own 64-byte aligned offset, and every
//! view holds the same [`AllocLease`](super::lease::AllocLease), registered once for the
//! whole block. `put` finds each leaf it meets (or a C-contiguous slice of one) inside that
//! registration by address and writes a reference to the block instead of copying
//! (`encode::arrays::alloc_location`); the frame lists the block once however many leaves it
//! references, so a message holds one reference to it. The block returns to the slab once
//! the sender's last view of it and every message referencing it are gone.
//!
//! # Specs
//!
//! A spec is a leaf or a container of specs. A **leaf** is an exact `tuple` of two items
//! whose second item is a dtype: a `torch.dtype` (the leaf becomes a tensor), or for NumPy a
//! `np.dtype`, a type (`np.float32`, `float`) or a string (`"float32"`, `"<f4"`).
//! **Containers** are dicts (their class kept), lists, tuples that are not leaves, named
//! tuples and dataclass instances (rebuilt as the receiver rebuilds them: no `__init__`).
//! The rule is never ambiguous: no dtype is a spec, so a 2-tuple whose second item is a
//! dtype cannot be a container of specs. Structured and subarray NumPy dtypes, spelt as
//! lists and tuples, must be passed as `np.dtype(...)`.
//!
//! A spec is read completely, and every size checked, before anything is allocated: a bad
//! spec allocates nothing and its error names the path (`spec['obs'][1]: ...`).
use std::sync::Arc;

use numpy::{PyArrayDescr, PyArrayDescrMethods, PyUntypedArray, PyUntypedArrayMethods};
use pyo3::exceptions::{PyOverflowError, PyTypeError, PyValueError};
use pyo3::intern;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyString, PyTuple, PyType};

use super::blocking::{deadline, wait};
use super::decode::numpy_view;
use super::dlpack::{self, DLDataType};
use super::encode::type_name;
use super::lease::{register_alloc, Keeper, Lease};
use super::types::{torch, torch_if_loaded, types, Torch, Types};
use crate::channel::Channel;
use crate::header::{array_nbytes, describe_unaddressable, MAX_BYTES, MAX_DEPTH, PAYLOAD_ALIGN};

/// Where a leaf's elements come from and what it becomes.
enum Dtype {
    Torch(DLDataType),
    Numpy(Py<PyArrayDescr>),
}

/// One array or tensor of a chunk: its layout, and its place in the block.
struct Leaf {
    shape: Vec<usize>,
    dtype: Dtype,
    len: usize,
    offset: usize,
}

/// The shape of a spec, with its leaves as indices into `Chunk::leaves`.
enum Node {
    Leaf(usize),
    List(Vec<Node>),
    Tuple(Vec<Node>),
    NamedTuple(Py<PyType>, Vec<Node>),
    /// `None`: a plain dict; otherwise an instance of the spec's own dict class, emptied,
    /// to refill (so `OrderedDict` and `defaultdict` stay what they were).
    Dict(Option<Py<PyAny>>, Vec<(Py<PyAny>, Node)>),
    Dataclass(Py<PyType>, Vec<(String, Node)>),
}

/// A spec, read and laid out: allocate `len` bytes, then build the views.
struct Chunk {
    root: Node,
    leaves: Vec<Leaf>,
    len: usize,
}

/// `Sender.alloc(shape, dtype)`: one array or tensor in its own block.
pub fn alloc_one<'py>(
    py: Python<'py>,
    channel: &Arc<Channel>,
    shape: &Bound<'py, PyAny>,
    dtype: &Bound<'py, PyAny>,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    let leaf = leaf(py, shape, dtype)?;
    let len = leaf.len;
    let chunk = Chunk {
        root: Node::Leaf(0),
        leaves: vec![leaf],
        len,
    };
    chunk.allocate(py, channel, timeout)
}

/// `Sender.alloc(spec)` (`example == false`) or `Sender.alloc_like(example)`.
pub fn alloc_structure<'py>(
    py: Python<'py>,
    channel: &Arc<Channel>,
    value: &Bound<'py, PyAny>,
    example: bool,
    timeout: Option<f64>,
) -> PyResult<Bound<'py, PyAny>> {
    // An int or a sequence of ints is a shape given without its dtype, not a spec (`[]`,
    // an empty structure, is a spec; so is a dict, whatever its keys).
    let shape_without_dtype = !example
        && !value.is_instance_of::<PyDict>()
        && alloc_shape(value).is_ok_and(|shape| !shape.is_empty());
    if shape_without_dtype {
        return Err(PyTypeError::new_err(format!(
            "alloc({}) has no dtype: call alloc(shape, dtype) for one array, or pass a spec \
             whose leaves are (shape, dtype) pairs",
            value.repr()?
        )));
    }
    let mut walk = Walk {
        py,
        types: types(py)?,
        torch: torch_if_loaded(py)?,
        example,
        leaves: vec![],
        path: String::from(if example { "example" } else { "spec" }),
    };
    let root = walk.node(value, 0)?;
    let chunk = layout(root, walk.leaves, &walk.path)?;
    chunk.allocate(py, channel, timeout)
}

/// Places the leaves one after another, each at a multiple of 64 bytes: the whole chunk's
/// size, summed with checks (many leaves, each addressable alone, may add up to more than
/// any memory).
fn layout(root: Node, mut leaves: Vec<Leaf>, what: &str) -> PyResult<Chunk> {
    let mut end: Option<usize> = Some(0);
    for leaf in &mut leaves {
        let offset = end.and_then(|end| end.checked_next_multiple_of(PAYLOAD_ALIGN));
        end = offset.and_then(|offset| offset.checked_add(leaf.len));
        leaf.offset = offset.unwrap_or(0);
    }
    match end.filter(|&len| len <= MAX_BYTES) {
        Some(len) => Ok(Chunk { root, leaves, len }),
        None => {
            // Only for the message: the exact sum, in u128 (at most 2^64 leaves of less than
            // 2^63 bytes each, plus their padding, fit).
            let needed = leaves.iter().fold(0u128, |sum, leaf| {
                sum.next_multiple_of(PAYLOAD_ALIGN as u128) + leaf.len as u128
            });
            Err(PyValueError::new_err(format!(
                "{what}: its {} arrays need {needed} bytes together (each 64-byte aligned), \
                 more than the {MAX_BYTES} bytes one block may hold; split it in several allocs",
                leaves.len()
            )))
        }
    }
}

impl Chunk {
    /// One block for every leaf (none when there is no leaf), and the structure of views.
    fn allocate<'py>(
        &self,
        py: Python<'py>,
        channel: &Arc<Channel>,
        timeout: Option<f64>,
    ) -> PyResult<Bound<'py, PyAny>> {
        if self.leaves.is_empty() {
            return self.build(py, &self.root, &[]);
        }
        let deadline = deadline(timeout)?;
        let len = self.len;
        let (block, start) = wait(py, |interrupt| {
            channel
                .allocate_buffer(len, deadline, interrupt)
                .map(|allocation| (allocation.block, allocation.address as usize))
        })?;
        // One registration for the whole block: `put` finds every leaf inside it.
        let lease = register_alloc(channel.clone(), block, start, len);
        let address = start as *mut u8;
        let base = Bound::new(py, Lease::new(Keeper::Alloc(lease.clone())))?.into_any();
        let views = self
            .leaves
            .iter()
            .map(|leaf| {
                // SAFETY: `layout` placed the leaf inside the `len` bytes just allocated (an
                // empty leaf at most at their end, which nothing reads).
                let data = unsafe { address.add(leaf.offset) };
                match &leaf.dtype {
                    Dtype::Torch(dl) => {
                        let keeper = Keeper::Alloc(lease.clone());
                        let capsule = dlpack::capsule(py, data, *dl, &leaf.shape, keeper)?;
                        torch(py)?.from_dlpack.bind(py).call1((capsule,))
                    }
                    Dtype::Numpy(descr) => {
                        numpy_view(py, descr.bind(py), &leaf.shape, data, base.clone(), true)
                    }
                }
            })
            .collect::<PyResult<Vec<_>>>()?;
        self.build(py, &self.root, &views)
    }

    fn build<'py>(
        &self,
        py: Python<'py>,
        node: &Node,
        views: &[Bound<'py, PyAny>],
    ) -> PyResult<Bound<'py, PyAny>> {
        let items = |nodes: &[Node]| -> PyResult<Vec<Bound<'py, PyAny>>> {
            nodes
                .iter()
                .map(|node| self.build(py, node, views))
                .collect()
        };
        Ok(match node {
            Node::Leaf(index) => views[*index].clone(),
            Node::List(nodes) => PyList::new(py, items(nodes)?)?.into_any(),
            Node::Tuple(nodes) => PyTuple::new(py, items(nodes)?)?.into_any(),
            Node::NamedTuple(class, nodes) => class
                .bind(py)
                .call_method1(intern!(py, "_make"), (items(nodes)?,))?,
            Node::Dict(empty, entries) => {
                let dict = match empty {
                    None => PyDict::new(py).into_any(),
                    Some(empty) => shallow_copy(empty.bind(py))?,
                };
                for (key, node) in entries {
                    dict.set_item(key.bind(py), self.build(py, node, views)?)?;
                }
                dict
            }
            Node::Dataclass(class, fields) => {
                let types = types(py)?;
                let object = types.object_new.bind(py).call1((class.bind(py),))?;
                for (name, node) in fields {
                    let value = self.build(py, node, views)?;
                    types
                        .object_setattr
                        .bind(py)
                        .call1((&object, name, value))?;
                }
                object
            }
        })
    }
}

/// Reads a spec or an example into a [`Node`] tree, collecting its leaves.
struct Walk<'py> {
    py: Python<'py>,
    types: &'py Types,
    torch: Option<&'py Torch>,
    /// Leaves are arrays and tensors (`alloc_like`), not `(shape, dtype)` pairs.
    example: bool,
    leaves: Vec<Leaf>,
    /// Where the walk is, e.g. `spec['obs'][2]`: the prefix of every error.
    path: String,
}

impl<'py> Walk<'py> {
    fn node(&mut self, value: &Bound<'py, PyAny>, depth: usize) -> PyResult<Node> {
        if depth >= MAX_DEPTH {
            return Err(PyValueError::new_err(format!(
                "{}: nested deeper than {MAX_DEPTH} levels (does the spec contain itself?)",
                self.path
            )));
        }
        let py = self.py;
        if let Some(leaf) = self.leaf(value)? {
            self.leaves.push(leaf);
            return Ok(Node::Leaf(self.leaves.len() - 1));
        }
        if let Ok(dict) = value.cast::<PyDict>() {
            let empty = match value.get_type().is(py.get_type::<PyDict>()) {
                true => None,
                false => {
                    let empty = shallow_copy(value)?;
                    empty.call_method0(intern!(py, "clear"))?;
                    Some(empty.unbind())
                }
            };
            let mut entries = Vec::with_capacity(dict.len());
            for (key, item) in dict.iter() {
                let segment = format!("[{}]", key.repr()?);
                let node = self.within(&segment, |walk| walk.node(&item, depth + 1))?;
                entries.push((key.unbind(), node));
            }
            return Ok(Node::Dict(empty, entries));
        }
        if let Ok(list) = value.cast::<PyList>() {
            return Ok(Node::List(self.items(list.iter(), depth)?));
        }
        if let Ok(tuple) = value.cast::<PyTuple>() {
            let class = value.get_type();
            let items = self.items(tuple.iter(), depth)?;
            if class.hasattr(intern!(py, "_fields"))? && class.hasattr(intern!(py, "_make"))? {
                return Ok(Node::NamedTuple(class.unbind(), items));
            }
            return Ok(Node::Tuple(items));
        }
        let class = value.get_type();
        if class.hasattr(intern!(py, "__dataclass_fields__"))? {
            let fields = self.types.dataclass_fields.bind(py).call1((value,))?;
            let mut nodes = vec![];
            for field in fields.try_iter()? {
                let name: String = field?.getattr(intern!(py, "name"))?.extract()?;
                let item = value.getattr(name.as_str())?;
                let node = self.within(&format!(".{name}"), |walk| walk.node(&item, depth + 1))?;
                nodes.push((name, node));
            }
            return Ok(Node::Dataclass(class.unbind(), nodes));
        }
        let expected = match self.example {
            true => "an np.ndarray or a torch.Tensor",
            false => "a (shape, dtype) pair",
        };
        Err(PyTypeError::new_err(format!(
            "{}: expected {expected}, or a dict, list, tuple, named tuple or dataclass \
             instance of them; got {} {}",
            self.path,
            type_name(value),
            short_repr(value)
        )))
    }

    fn items(
        &mut self,
        items: impl Iterator<Item = Bound<'py, PyAny>>,
        depth: usize,
    ) -> PyResult<Vec<Node>> {
        items
            .enumerate()
            .map(|(index, item)| {
                self.within(&format!("[{index}]"), |walk| walk.node(&item, depth + 1))
            })
            .collect()
    }

    /// Runs `inside` with `segment` appended to the path.
    fn within<T>(&mut self, segment: &str, inside: impl FnOnce(&mut Self) -> T) -> T {
        let mark = self.path.len();
        self.path.push_str(segment);
        let result = inside(self);
        self.path.truncate(mark);
        result
    }

    /// `value` as a leaf, if it is one; errors in a leaf are raised with the path.
    fn leaf(&self, value: &Bound<'py, PyAny>) -> PyResult<Option<Leaf>> {
        let py = self.py;
        let found = if self.example {
            self.example_leaf(value)
        } else {
            let Some((shape, dtype)) = self.spec_pair(value)? else {
                return Ok(None);
            };
            leaf(py, &shape, &dtype).map(Some)
        };
        found.map_err(|error| at(py, &self.path, error))
    }

    /// `value` as the `(shape, dtype)` of a spec leaf, if it is one.
    fn spec_pair(
        &self,
        value: &Bound<'py, PyAny>,
    ) -> PyResult<Option<(Bound<'py, PyAny>, Bound<'py, PyAny>)>> {
        let Ok(pair) = value.cast_exact::<PyTuple>() else {
            return Ok(None);
        };
        if pair.len() != 2 || !self.is_dtype(&pair.get_item(1)?)? {
            return Ok(None);
        }
        Ok(Some((pair.get_item(0)?, pair.get_item(1)?)))
    }

    /// What a spec leaf's second item may be (see the module docs).
    fn is_dtype(&self, value: &Bound<'py, PyAny>) -> PyResult<bool> {
        let py = self.py;
        if let Some(torch) = self.torch {
            if value.is_instance(torch.dtype.bind(py))? {
                return Ok(true);
            }
        }
        Ok(value.is_instance(self.types.np_dtype.bind(py))?
            || value.is_instance_of::<PyType>()
            || value.is_instance_of::<PyString>())
    }

    fn example_leaf(&self, value: &Bound<'py, PyAny>) -> PyResult<Option<Leaf>> {
        let py = self.py;
        if self.spec_pair(value)?.is_some() {
            return Err(PyTypeError::new_err(format!(
                "{} is a (shape, dtype) pair: alloc_like takes arrays and tensors; pass a \
                 spec to alloc",
                short_repr(value)
            )));
        }
        if let Ok(array) = value.cast::<PyUntypedArray>() {
            let descr = array.dtype();
            return numpy_leaf(array.shape().to_vec(), descr).map(Some);
        }
        match self.torch {
            Some(torch) if value.is_instance(torch.tensor.bind(py))? => {
                let shape = value
                    .getattr(intern!(py, "shape"))?
                    .extract::<Vec<usize>>()?;
                torch_leaf(shape, &value.getattr(intern!(py, "dtype"))?).map(Some)
            }
            _ => Ok(None),
        }
    }
}

/// The leaf of `shape` and `dtype` (torch or NumPy), its size checked.
fn leaf<'py>(
    py: Python<'py>,
    shape: &Bound<'py, PyAny>,
    dtype: &Bound<'py, PyAny>,
) -> PyResult<Leaf> {
    let shape = alloc_shape(shape)?;
    match torch_if_loaded(py)? {
        Some(torch) if dtype.is_instance(torch.dtype.bind(py))? => torch_leaf(shape, dtype),
        _ => numpy_leaf(shape, PyArrayDescr::new(py, dtype)?),
    }
}

fn torch_leaf(shape: Vec<usize>, dtype: &Bound<'_, PyAny>) -> PyResult<Leaf> {
    let name = dtype.str()?.to_string();
    let name = name.strip_prefix("torch.").unwrap_or(&name).to_owned();
    let dl = dlpack::dtype_of(&name).ok_or_else(|| {
        PyTypeError::new_err(format!("alloc does not support dtype torch.{name}"))
    })?;
    let len = nbytes(&shape, usize::from(dl.bits).div_ceil(8))?;
    Ok(Leaf {
        shape,
        dtype: Dtype::Torch(dl),
        len,
        offset: 0,
    })
}

fn numpy_leaf(shape: Vec<usize>, descr: Bound<'_, PyArrayDescr>) -> PyResult<Leaf> {
    if descr.has_object() {
        return Err(PyTypeError::new_err(
            "alloc cannot hold Python objects (object dtype)",
        ));
    }
    let len = nbytes(&shape, descr.itemsize())?;
    Ok(Leaf {
        shape,
        dtype: Dtype::Numpy(descr.unbind()),
        len,
        offset: 0,
    })
}

fn nbytes(shape: &[usize], itemsize: usize) -> PyResult<usize> {
    array_nbytes(shape, itemsize).ok_or_else(|| {
        PyValueError::new_err(format!(
            "cannot alloc: {}",
            describe_unaddressable("an array", shape, itemsize)
        ))
    })
}

/// `error` again (same exception type, the original as its cause), its message prefixed
/// with `path`.
fn at(py: Python<'_>, path: &str, error: PyErr) -> PyErr {
    let message = format!("{path}: {}", error.value(py));
    let kind = error.get_type(py);
    let raised = match kind.call1((message.clone(),)) {
        Ok(instance) => PyErr::from_value(instance),
        Err(_) => PyTypeError::new_err(message),
    };
    raised.set_cause(py, Some(error));
    raised
}

/// `copy.copy(value)`: a dict of the same class (`dict.copy` would make a plain dict of a
/// subclass), default factory and all.
fn shallow_copy<'py>(value: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    let py = value.py();
    py.import(intern!(py, "copy"))?
        .call_method1(intern!(py, "copy"), (value,))
}

/// A repr for error messages, cut short: specs may hold large values.
fn short_repr(value: &Bound<'_, PyAny>) -> String {
    let text = value.repr().map(|r| r.to_string()).unwrap_or_default();
    match text.char_indices().nth(60) {
        Some((cut, _)) => format!("{}...", &text[..cut]),
        None => text,
    }
}

/// The `shape` of an `alloc`: an int or a sequence of ints (anything with `__index__`, as
/// NumPy takes). A dimension that is not an int is a `TypeError`; one that is negative or
/// larger than any array may be, a `ValueError` naming it.
fn alloc_shape(shape: &Bound<'_, PyAny>) -> PyResult<Vec<usize>> {
    let not_ints = || {
        PyTypeError::new_err(format!(
            "shape must be an int or a sequence of ints, got {}",
            shape.repr().map(|r| r.to_string()).unwrap_or_default()
        ))
    };
    // `extract::<usize>` goes through `__index__`: a TypeError means "not an int", an
    // OverflowError an int out of range.
    let is_int = |error: &PyErr| error.is_instance_of::<PyOverflowError>(shape.py());
    match shape.extract::<usize>() {
        Err(error) if !is_int(&error) => {} // a sequence, or no shape at all
        extracted => return Ok(vec![dimension(0, shape, extracted)?]),
    }
    let mut dims = vec![];
    for (axis, dim) in shape.try_iter().map_err(|_| not_ints())?.enumerate() {
        let dim = dim?;
        match dim.extract::<usize>() {
            Err(error) if !is_int(&error) => return Err(not_ints()),
            extracted => dims.push(dimension(axis, &dim, extracted)?),
        }
    }
    Ok(dims)
}

/// Dimension `axis` of an `alloc` shape, `value` as given and as extracted to `usize`.
fn dimension(axis: usize, value: &Bound<'_, PyAny>, extracted: PyResult<usize>) -> PyResult<usize> {
    match extracted {
        Ok(dim) if dim <= MAX_BYTES => Ok(dim),
        _ if value.lt(0)? => Err(PyValueError::new_err(format!(
            "shape[{axis}] is {value}: a dimension cannot be negative"
        ))),
        _ => Err(PyValueError::new_err(format!(
            "shape[{axis}] is {value}, more than the {MAX_BYTES} an array dimension may be"
        ))),
    }
}
