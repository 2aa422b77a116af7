"""`tensorslab.share`: tensors, modules and arrays in shared memory that stays shared.

What `tensor.share_memory_()` and `module.share_memory()` give torch users, with one file
descriptor per `share` call instead of one per tensor: `share(obj)` copies every tensor of
`obj` into ONE new shared segment (a memfd, see `crate::shared`), each 64-byte aligned, and
re-points the tensors at it in place (`tensor.data = view`). Passing such a tensor, module
or array to another process (as a `Process` argument, through a `multiprocessing` queue or
pipe, or through a tensorslab channel or Queue) hands over a *reference* to the segment:
the receiver maps the same memory (once per segment, however many tensors it receives from
it), so in-place updates are seen by every process.

How references travel:
- `multiprocessing` pickles with `multiprocessing.reduction.ForkingPickler`. We set its
  `reducer_override`, which the pickler asks before its dispatch table: shared tensors and
  arrays become references there, and everything else falls through to the dispatch table,
  where `torch.multiprocessing` registers its own reducers. Neither import order can
  override the other (torch registers into the table, we never do).
- A tensorslab channel's encoder asks `_reference` before exporting a tensor or array (only
  when this process maps a shared segment at all) and pickles the reference it returns;
  what it pickles for other reasons (a module) it pickles with `_dumps`, whose pickler
  turns the shared tensors inside into references too. A reference unpickles through
  `_rebuild_tensor` / `_rebuild_array`, which only attach the segment and build a view.
  Channel receivers unpickle (see the README, "What decoding may build");
  `loads(allow_pickle=False)` refuses a reference as it refuses every pickle.

A reference names the sending process and the processes it knows held the segment before
(its creator first); the receiver attaches through `/proc/<pid>/fd/<fd>` of the first that
still holds it. When none does (every holder dropped the tensor or exited before the
receiver got it), rebuilding raises `tensorslab.PeerGone`: the memory is gone with them.
"""

from __future__ import annotations

import io
import pickle
import sys
from multiprocessing.reduction import ForkingPickler
from typing import Any

from . import _tensorslab

__all__ = ["share"]

#: What `share` is documented to take, for error messages.
_TAKES = "a torch tensor (or nn.Parameter), an nn.Module or a NumPy array"


def share(obj: Any) -> Any:
    """Move `obj`'s memory into one new shared segment, in place; return `obj`.

    `obj` is a torch tensor or `nn.Parameter` (its storage), an `nn.Module` (every parameter
    and buffer, all in one segment) or a NumPy array (a shared *copy* is returned: an array
    cannot be re-pointed in place). Tensors already in a shared segment stay where they are.
    Views of a tensor taken before `share` keep the old, private memory.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        if isinstance(obj, torch.nn.Module):
            items = [(f"parameter {name!r}", t) for name, t in obj.named_parameters()]
            items += [(f"buffer {name!r}", t) for name, t in obj.named_buffers()]
            _share_tensors(torch, items, f"share({type(obj).__name__})")
            return obj
        if isinstance(obj, torch.Tensor):
            _share_tensors(torch, [("tensor", obj)], "share(tensor)")
            return obj
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(obj, numpy.ndarray):
        return _share_array(numpy, obj)
    raise TypeError(f"tensorslab.share() takes {_TAKES}, not {type(obj).__qualname__}")


def _check_tensor(torch: Any, tensor: Any, where: str) -> None:
    if tensor.device.type != "cpu":
        raise TypeError(
            f"{where} is on {tensor.device}: tensorslab shares CPU memory only (no CUDA path "
            f"yet, see the README); share it before moving it to {tensor.device.type}"
        )
    if tensor.layout != torch.strided:
        raise TypeError(
            f"{where} is a sparse tensor ({tensor.layout}): tensorslab.share moves dense "
            "tensors; call .to_dense() first"
        )
    if tensor.is_quantized or tensor.is_nested:
        kind = "quantized" if tensor.is_quantized else "nested"
        raise TypeError(f"{where} is a {kind} tensor: tensorslab.share moves dense tensors")


def _share_tensors(torch: Any, items: list, call: str) -> None:
    """Copy the storages of `items` ((where, tensor) pairs) into one segment and re-point
    each tensor at its copy. Tensors viewing one storage (tied weights) keep sharing it."""
    storages: dict = {}
    for where, tensor in items:
        _check_tensor(torch, tensor, f"{call}: {where}")
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or _find(storage.data_ptr(), storage.nbytes()) is not None:
            continue  # nothing to share, or shared already
        key = (storage.data_ptr(), storage.nbytes())
        storages.setdefault(key, (storage, []))[1].append(tensor)
    if not storages:
        return
    groups = list(storages.values())
    offsets, nbytes = _tensorslab._share_layout([storage.nbytes() for storage, _ in groups])
    base = torch.from_dlpack(_segment(_tensorslab._share_create(nbytes)))
    for offset, (storage, tensors) in zip(offsets, groups):
        size = storage.nbytes()
        source = torch.empty(0, dtype=torch.uint8).set_(storage)
        base[offset : offset + size].copy_(source)
        for tensor in tensors:
            typed = base.view(tensor.dtype)
            # `offset` is a multiple of 64, so of every itemsize.
            start = offset // tensor.element_size() + tensor.storage_offset()
            tensor.data = typed.as_strided(tensor.size(), tensor.stride(), start)


def _share_array(numpy: Any, array: Any) -> Any:
    if array.dtype.hasobject:
        raise TypeError(
            "share(array): a NumPy array of Python objects cannot be shared (its elements "
            "are pointers into this process)"
        )
    segment = _segment(_tensorslab._share_create(max(array.nbytes, 1)))
    shared = numpy.ndarray(array.shape, array.dtype, buffer=segment.array())
    numpy.copyto(shared, array)
    return shared


def _find(address: int, nbytes: int) -> Any:
    return _tensorslab._share_find(address, nbytes) if _tensorslab._share_live() else None


def _segment(segment: Any) -> Any:
    """Every process that holds a shared segment may pickle it on: install the reducer."""
    _install_reducer()
    return segment


# ---- references ----


class _Reference:
    """A pickle-ready reference to a shared tensor or array: unpickles as the rebuilt
    view, never carries the data."""

    __slots__ = ("_reduced",)

    def __init__(self, reduced: tuple) -> None:
        self._reduced = reduced

    def __reduce__(self) -> tuple:
        return self._reduced


def _reduction(obj: Any) -> tuple | None:
    """`(rebuild, args)` for a tensor or array whose memory lies in a shared segment."""
    module = type(obj).__module__
    if module in ("torch", "torch.nn.parameter"):
        torch = sys.modules["torch"]
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.device.type != "cpu":
            return None
        if obj.layout != torch.strided or obj.is_quantized or obj.is_nested:
            return None
        storage = obj.untyped_storage()
        found = _find(storage.data_ptr(), storage.nbytes())
        if found is None:
            return None
        segment, _ = found
        if obj.requires_grad and not obj.is_leaf:
            raise RuntimeError(
                "cannot send a non-leaf tensor that requires grad from a shared segment "
                "(as torch.multiprocessing refuses it): send .detach() instead"
            )
        offset = obj.data_ptr() - segment.address
        args = (
            segment.reference(),
            offset,
            obj.dtype,
            tuple(obj.size()),
            obj.stride(),
            obj.requires_grad,
            type(obj) is torch.nn.Parameter,
        )
        return _rebuild_tensor, args
    if module == "numpy":
        numpy = sys.modules["numpy"]
        if type(obj) is not numpy.ndarray or obj.dtype.hasobject:
            return None
        low, high = _byte_bounds(numpy, obj)
        found = _find(low, high - low)
        if found is None:
            return None
        segment, _ = found
        offset = obj.__array_interface__["data"][0] - segment.address
        args = (
            segment.reference(),
            offset,
            obj.dtype,
            obj.shape,
            obj.strides,
            bool(obj.flags.writeable),
        )
        return _rebuild_array, args
    return None


def _byte_bounds(numpy: Any, array: Any) -> tuple:
    utils = getattr(numpy.lib, "array_utils", None)
    return (utils.byte_bounds if utils is not None else numpy.byte_bounds)(array)


def _reference(obj: Any) -> _Reference | None:
    """What the channel encoder sends for `obj` instead of a copy, or None."""
    reduced = _reduction(obj)
    return None if reduced is None else _Reference(reduced)


def _rebuild_tensor(reference, offset, dtype, size, stride, requires_grad, parameter):
    torch = sys.modules.get("torch") or __import__("torch")
    base = torch.from_dlpack(_segment(_tensorslab._share_attach(reference)))
    typed = base.view(dtype)
    itemsize = typed.element_size()
    if offset % itemsize:
        raise ValueError(f"shared tensor at byte {offset} is not aligned to its {dtype}")
    # as_strided checks that every element lies inside the segment.
    tensor = typed.as_strided(size, stride, offset // itemsize)
    if parameter:
        return torch.nn.Parameter(tensor, requires_grad=requires_grad)
    return tensor.requires_grad_(requires_grad) if requires_grad else tensor


def _rebuild_array(reference, offset, dtype, shape, strides, writeable):
    numpy = sys.modules.get("numpy") or __import__("numpy")
    segment = _segment(_tensorslab._share_attach(reference))
    # The constructor checks that every element lies inside the segment.
    array = numpy.ndarray(shape, dtype, buffer=segment.array(), offset=offset, strides=strides)
    if not writeable:
        array.flags.writeable = False
    return array


class _Pickler(pickle.Pickler):
    """The channel encoder's pickler while this process maps a shared segment: shared
    tensors and arrays inside a pickled object (a module's parameters) become references;
    everything else pickles as `pickle.dumps` pickles it."""

    def reducer_override(self, obj: Any) -> Any:
        reduced = _reduction(obj) if _tensorslab._share_live() else None
        return NotImplemented if reduced is None else reduced


def _dumps(obj: Any, protocol: int = 5, buffer_callback: Any = None) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=protocol, buffer_callback=buffer_callback).dump(obj)
    return buffer.getvalue()


# ---- the multiprocessing reducer ----

_installed = False


def _install_reducer() -> None:
    """Set `ForkingPickler.reducer_override` (once per process; a fork child inherits it),
    chaining whatever override was there before."""
    global _installed
    if _installed:
        return
    previous = getattr(ForkingPickler, "reducer_override", None)

    def reducer_override(pickler: Any, obj: Any) -> Any:
        if _tensorslab._share_live():
            reduced = _reduction(obj)
            if reduced is not None:
                return reduced
        if previous is not None:
            return previous(pickler, obj)
        return NotImplemented

    ForkingPickler.reducer_override = reducer_override
    _installed = True
