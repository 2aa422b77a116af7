"""``tensorslab.torch.DataLoader``: torch's DataLoader, its workers' batches handed over in a slab.

Change one import and keep everything else::

    from tensorslab.torch import DataLoader   # instead of torch.utils.data.DataLoader

What this module owns: the transport between DataLoader workers and the main process, and
the default collate's output allocation. What it must never do: change which samples are
loaded, in which order, with which seeds, or how failures surface. Those stay torch's own
code, reused by subclassing and calling rather than copying:

- :class:`DataLoader` subclasses ``torch.utils.data.DataLoader``; with ``num_workers=0`` it
  is torch's loader unchanged.
- With workers, its iterator subclasses torch's ``_MultiProcessingDataLoaderIter``. Torch
  creates the worker *result queue* with the first ``multiprocessing_context.Queue()`` call
  of that iterator's ``__init__``; the iterator is handed a context that answers that one
  call with a :class:`tensorslab.Queue` (a slab channel) and delegates everything else
  (index queues, events, processes) to the real context. The iterator checks afterwards
  that torch did use it as the result queue, so a torch release that reorders those calls
  fails loudly instead of silently moving batches through the wrong queue.
- Workers run torch's own ``_worker_loop``; the sampler, seeds, ``get_worker_info()``,
  ``IterableDataset`` sharding, ``persistent_workers``, ``timeout``, error re-raising and
  the dead-worker checks are torch's. A ``tensorslab.Empty`` is a ``queue.Empty``, which is
  what torch's checks expect from ``get(timeout=...)``.

The fast path: when ``collate_fn`` is torch's ``default_collate``, workers collate with
torch's ``collate()`` and a tensor rule that allocates each batch tensor in the slab
(``Sender.alloc``) and stacks into it, so the batch crosses processes with no copy and no
pickling of tensor data; the main process receives zero-copy views, and a batch's memory
returns to the slab when the training step drops its last tensor. Anything the slab cannot
hold (nested, sparse or non-CPU tensors, tensors that require grad, mismatched shapes or
dtypes, dtypes ``alloc`` does not support) goes through torch's own ``collate_tensor_fn``,
with torch's errors. A custom ``collate_fn``'s output is copied into the slab once by
``put``.

Memory: the slab holds the batches in flight (at most ``prefetch_factor * num_workers``
queued, plus those the program still holds). It grows on demand up to ``max_slab_bytes``
(a keyword of :class:`DataLoader`; default: the channel's default, half the memory
available). If the program keeps batches alive (e.g. appends them to a list) until the slab
is full, a worker waits :data:`SLAB_WAIT_SECONDS` for room, then sends the batch the way
torch does (torch shared memory passed by file descriptor, through a small message) and
keeps doing so, without waiting, until the slab has room again; the main process warns
once per iterator (:class:`SlabFallbackWarning`) with the slab's own account of what holds
its memory. It never deadlocks on a full slab, and results are the same either way.

``pin_memory=True`` behaves as in torch (it warns when no accelerator is present; with one,
torch's pin-memory thread copies each batch into pinned memory, after which the slab views
are dropped). Registering the slab itself as pinned memory would save that copy: not done
yet.

Limitation: received batch tensors view shared memory that tensorslab owns; their storage
cannot be resized (``Tensor.resize_`` beyond the size raises), as for any tensor from DLPack.
"""

from __future__ import annotations

import inspect
import os
import pickle
import warnings
from multiprocessing.reduction import ForkingPickler
from typing import Any, NamedTuple, TypeVar, cast

import torch
import torch.multiprocessing  # noqa: F401  (registers torch's ForkingPickler reductions)
from torch._utils import ExceptionWrapper
from torch.utils.data import dataloader as torch_dataloader
from torch.utils.data._utils import collate as torch_collate
from torch.utils.data._utils import worker as torch_worker

from .exceptions import EncodeError, Full
from .queue import Queue

__all__ = ["DataLoader", "SLAB_WAIT_SECONDS", "SlabFallbackWarning"]

#: How long a worker waits for slab room (to ``alloc`` a batch tensor, or to ``put`` a
#: batch) before it falls back to torch's shared memory. Read when an iterator is created.
SLAB_WAIT_SECONDS = 2.0

# A fallback message holds a pickle; past this size the pickle itself travels in torch
# shared memory, so the message stays small enough to fit a nearly full slab.
_SMALL_PICKLE_BYTES = 64 * 1024

# How often a worker blocked on a full slab checks that the main process is still alive.
_PARENT_CHECK_SECONDS = torch_dataloader._utils.MP_STATUS_CHECK_INTERVAL


class SlabFallbackWarning(UserWarning):
    """Batches went through torch's shared memory because the slab was full."""


class _Fallback(NamedTuple):
    """A worker's message sent the way torch sends it (``ForkingPickler``), because the slab
    had no room for it. ``payload`` is the pickle, or (when large) a torch uint8 tensor in
    torch shared memory holding the pickle, itself pickled."""

    payload: bytes
    nested: bool
    reason: str


def _forking_dumps(obj: Any) -> tuple[bytes, bool]:
    payload = bytes(ForkingPickler.dumps(obj))
    if len(payload) <= _SMALL_PICKLE_BYTES:
        return payload, False
    holder = torch.frombuffer(bytearray(payload), dtype=torch.uint8).share_memory_()
    return bytes(ForkingPickler.dumps(holder)), True


def _forking_loads(message: _Fallback) -> Any:
    if not message.nested:
        return pickle.loads(message.payload)
    holder = pickle.loads(message.payload)
    return pickle.loads(holder.numpy().data)


class _ResultQueue(Queue):
    """The workers' result queue: a :class:`tensorslab.Queue` whose blocking ``put`` falls
    back to torch's transport when the slab stays full, and which allocates batch tensors.

    Every process holding it (the main process and each worker) keeps its own wait state:
    after one fallback, a worker tries the slab without waiting until it has room again.
    """

    def __init__(self, slab_wait: float, **channel_options: Any) -> None:
        super().__init__(0, **channel_options)
        self._slab_wait = slab_wait
        self._main_pid = os.getpid()
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._waiting = True  # False after a fallback: try the slab without waiting
        self._warned = False

    @classmethod
    def _rebuild(cls, tx, rx, slab_wait: float, main_pid: int) -> _ResultQueue:
        queue = cast(_ResultQueue, cls._from_handles(0, tx, rx))  # builds a cls
        queue._slab_wait, queue._main_pid = slab_wait, main_pid
        queue._init_process_state()
        return queue

    def __reduce__(self):
        return (_ResultQueue._rebuild, (self._tx, self._rx, self._slab_wait, self._main_pid))

    # -- worker side ------------------------------------------------------------------

    def alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An uninitialised tensor in the slab, or None when the slab has no room in time
        (or cannot hold this dtype or size): the caller then allocates the torch way."""
        try:
            out = self._tx.alloc(shape, dtype, timeout=self._slab_wait if self._waiting else 0)
        except Full:
            self._waiting = False
            return None
        except (TypeError, ValueError):
            # A dtype alloc does not support, or a tensor larger than max_slab_bytes.
            if self._tx.closed:
                raise
            return None
        self._waiting = True
        return out

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        if not block or timeout is not None:
            super().put(obj, block, timeout)  # a caller asking for queue semantics gets them
            return
        try:
            if self._waiting:
                self._tx.put(obj, timeout=self._slab_wait)
            else:
                self._tx.put_nowait(obj)
            self._waiting = True
            return
        except Full as error:
            reason = str(error)
        except EncodeError:
            # torch's mp.Queue would drop such a batch in its feeder thread and leave the
            # main process waiting; re-raise it there instead, as a worker error.
            if not (isinstance(obj, tuple) and len(obj) == 2):
                raise
            info = torch_worker.get_worker_info()
            where = "in DataLoader worker process " + ("?" if info is None else str(info.id))
            obj = (obj[0], ExceptionWrapper(where=where))
            reason = ""
            try:
                self._tx.put(obj, timeout=self._slab_wait)
                return
            except Full:
                pass
        except ValueError as error:  # larger than max_slab_bytes
            if self._tx.closed:
                raise
            reason = str(error)
        self._waiting = False
        self._put_small(_Fallback(*_forking_dumps(obj), reason))

    def _put_small(self, message: _Fallback) -> None:
        # Even a small message needs slab room; wait for it as long as the main process lives
        # (the main process drops or consumes batches; torch's own watchdog does the same).
        while True:
            try:
                self._tx.put(message, timeout=_PARENT_CHECK_SECONDS)
                return
            except Full:
                if os.getpid() != self._main_pid and os.getppid() != self._main_pid:
                    raise

    # -- main side --------------------------------------------------------------------

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        return self._unwrap(self._rx.get(block, timeout))

    def get_nowait(self) -> Any:
        return self._unwrap(self._rx.get_nowait())

    def _unwrap(self, message: Any) -> Any:
        if type(message) is not _Fallback:
            return message
        if not self._warned and message.reason:
            self._warned = True
            warnings.warn(
                "tensorslab.torch.DataLoader: a worker found the slab full and sent a batch "
                "through torch's shared memory instead (slower; it does so until the slab has "
                f"room again). The slab said: {message.reason}. Batches kept alive (e.g. in a "
                "list) hold slab memory: drop them sooner, or pass a larger max_slab_bytes= "
                "to the DataLoader.",
                SlabFallbackWarning,
                stacklevel=4,
            )
        return _forking_loads(message)


class _SlabCollate:
    """``default_collate``, except that each batch tensor is allocated in the slab.

    Picklable: a spawned worker gets its own handle on the result queue with it.
    """

    def __init__(self, queue: _ResultQueue) -> None:
        self.queue = queue

    def __call__(self, batch: Any) -> Any:
        # Built per batch from torch's (possibly user-extended) map; only torch's own tensor
        # rule is replaced, in place, so the lookup order stays torch's.
        collate_fn_map = dict(torch_collate.default_collate_fn_map)
        if collate_fn_map.get(torch.Tensor) is torch_collate.collate_tensor_fn:
            collate_fn_map[torch.Tensor] = self.collate_tensors
        return torch_collate.collate(batch, collate_fn_map=collate_fn_map)

    def collate_tensors(self, batch: list, *, collate_fn_map: dict | None = None) -> Any:
        elem = batch[0]
        out = self.queue.alloc((len(batch), *elem.shape), elem.dtype) if _fits(batch) else None
        if out is None:
            return torch_collate.collate_tensor_fn(batch, collate_fn_map=collate_fn_map)
        return torch.stack(batch, 0, out=out)


def _fits(batch: list) -> bool:
    """Whether stacking ``batch`` into a fresh strided CPU tensor gives what torch's
    ``collate_tensor_fn`` gives; anything else is left to torch (with its errors)."""
    elem = batch[0]
    if (
        type(elem) is not torch.Tensor
        or elem.layout != torch.strided
        or elem.is_nested
        or elem.is_quantized
        or elem.device.type != "cpu"
        or elem.requires_grad
    ):
        return False
    shape, dtype = elem.shape, elem.dtype
    return all(
        type(t) is torch.Tensor
        and t.shape == shape
        and t.dtype == dtype
        and t.device == elem.device
        for t in batch
    )


class _ContextWithResultQueue:
    """A multiprocessing context whose first ``Queue()`` is the given queue."""

    def __init__(self, context: Any, result_queue: _ResultQueue) -> None:
        self._context = context
        self._result_queue: _ResultQueue | None = result_queue

    def Queue(self, *args: Any, **kwargs: Any) -> Any:  # noqa: N802  (the context's name)
        queue, self._result_queue = self._result_queue, None
        return queue if queue is not None else self._context.Queue(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class _LoaderForIterator:
    """What the iterator's ``__init__`` reads of the loader, with the context and collate
    function replaced; everything else is read from the loader itself."""

    def __init__(self, loader: DataLoader, context: Any, collate_fn: Any) -> None:
        self._loader = loader
        self.multiprocessing_context = context
        self.collate_fn = collate_fn

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class _SlabMultiProcessingDataLoaderIter(torch_dataloader._MultiProcessingDataLoaderIter):
    def __init__(self, loader: DataLoader) -> None:
        options = {
            name: value
            for name, value in (
                ("max_slab_bytes", loader.max_slab_bytes),
                ("slab_bytes", loader.slab_bytes),
            )
            if value is not None
        }
        result_queue = _ResultQueue(SLAB_WAIT_SECONDS, **options)
        context = loader.multiprocessing_context or torch.multiprocessing
        collate_fn = loader.collate_fn
        if collate_fn is torch_collate.default_collate:
            collate_fn = _SlabCollate(result_queue)
        view = _LoaderForIterator(
            loader, _ContextWithResultQueue(context, result_queue), collate_fn
        )
        super().__init__(view)
        if self._worker_result_queue is not result_queue or any(
            queue is result_queue for queue in self._index_queues
        ):
            self._shutdown_workers()
            raise RuntimeError(
                f"tensorslab.torch.DataLoader does not support torch {torch.__version__}: its "
                "DataLoader iterator no longer creates the worker result queue with its first "
                "multiprocessing_context.Queue() call; use torch.utils.data.DataLoader"
            )


#: What a loader yields, as torch's own ``DataLoader[T_co]``: ``DataLoader[List[Tensor]]``
#: in an annotation evaluated at run time works with ours too.
T_co = TypeVar("T_co", covariant=True)


class DataLoader(torch_dataloader.DataLoader[T_co]):
    """``torch.utils.data.DataLoader`` whose workers hand batches over through a tensorslab
    slab (see the module documentation): same arguments, same batches, same errors.

    Two keyword arguments of its own, read when an iterator starts its workers:
    ``max_slab_bytes`` (the most shared memory the batches in flight may take before
    workers fall back to torch's transport; default: the channel's default) and
    ``slab_bytes`` (the slab's initial size; default 16 MiB, growing on demand).
    """

    def __init__(
        self,
        dataset: Any,
        *args: Any,
        max_slab_bytes: int | None = None,
        slab_bytes: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.max_slab_bytes = max_slab_bytes
        self.slab_bytes = slab_bytes
        super().__init__(dataset, *args, **kwargs)

    def _get_iterator(self) -> torch_dataloader._BaseDataLoaderIter:
        if self.num_workers == 0:
            return super()._get_iterator()
        self.check_worker_number_rationality()
        return _SlabMultiProcessingDataLoaderIter(self)


def _signature() -> inspect.Signature:
    # torch's parameters plus ours, for tools that read the constructor's signature to
    # re-create a loader (Lightning does) or to document it.
    base = inspect.signature(torch_dataloader.DataLoader.__init__)
    ours = [
        inspect.Parameter(
            name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation="int | None"
        )
        for name in ("max_slab_bytes", "slab_bytes")
    ]
    parameters = [p for p in base.parameters.values() if p.kind != p.VAR_KEYWORD]
    rest = [p for p in base.parameters.values() if p.kind == p.VAR_KEYWORD]
    return base.replace(parameters=parameters + ours + rest)


DataLoader.__init__.__signature__ = _signature()  # type: ignore[attr-defined]
