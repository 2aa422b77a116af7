"""``tensorslab.multiprocessing``: ``import tensorslab.multiprocessing as mp`` in place of
``import multiprocessing`` or ``import torch.multiprocessing``.

Its queues (``Queue``, ``SimpleQueue``, ``JoinableQueue``), ``Pipe`` and ``Pool`` carry
messages through tensorslab channels: arrays and tensors in them travel through the slab
(one allocation per message, zero-copy views on arrival), everything else as the channel
encodes it (pickled where it has no encoding of its own). ``spawn``, ``start_processes``
and their exceptions follow ``torch.multiprocessing``. Every other name is the standard
library's own (``Process``, ``Lock``, ``Event``, ``Manager``, ``set_start_method``, ...).

Importing this module imports neither torch nor NumPy.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
from multiprocessing import *  # noqa: F403  (every name not defined below)
from typing import Any

from ..queue import Queue
from .connection import Connection, Pipe
from .pool import Pool
from .queues import JoinableQueue, SimpleQueue
from .spawn import (
    ProcessContext,
    ProcessException,
    ProcessExitedException,
    ProcessRaisedException,
    spawn,
    start_processes,
)


class _Context(multiprocessing.context.BaseContext):
    """A ``multiprocessing`` context whose queues, pipes and pools are tensorslab's; every
    other attribute is that of the standard library's context for the same start method.

    A ``BaseContext``, so code that checks for one (torch's DataLoader does) accepts it.
    """

    def __init__(self, stdlib_context: multiprocessing.context.BaseContext) -> None:
        self._stdlib_context = stdlib_context
        self._name = getattr(stdlib_context, "_name", None)
        self.Process = stdlib_context.Process

    def __getattr__(self, name: str) -> Any:
        if name == "_stdlib_context":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self._stdlib_context, name)

    def Queue(self, maxsize: int = 0) -> Queue:
        return Queue(maxsize)

    def SimpleQueue(self) -> SimpleQueue:
        return SimpleQueue()

    def JoinableQueue(self, maxsize: int = 0) -> JoinableQueue:
        return JoinableQueue(maxsize, ctx=self._stdlib_context)

    def Pipe(self, duplex: bool = True) -> tuple[Connection, Connection]:
        return Pipe(duplex)

    def Pool(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None):
        return Pool(processes, initializer, initargs, maxtasksperchild, self._stdlib_context)

    def get_context(self, method: str | None = None) -> _Context:
        if method is None:
            return self
        return get_context(method)

    def get_start_method(self, allow_none: bool = False) -> str | None:
        return self._stdlib_context.get_start_method(allow_none)

    def set_start_method(self, method: str | None, force: bool = False) -> None:
        self._stdlib_context.set_start_method(method, force)

    def __repr__(self) -> str:
        return f"<tensorslab.multiprocessing context {self._stdlib_context.get_start_method()!r}>"


_contexts: dict[int, _Context] = {}


def get_context(method: str | None = None) -> _Context:
    """The context for ``method`` (None: the current default start method), as
    ``multiprocessing.get_context``, with tensorslab's queues, pipes and pools."""
    stdlib_context = multiprocessing.get_context(method)
    context = _contexts.get(id(stdlib_context))
    if context is None:
        # The standard library's contexts live as long as the interpreter: ids stay theirs.
        context = _contexts[id(stdlib_context)] = _Context(stdlib_context)
    return context


# torch.multiprocessing's sharing strategy applies to tensors that torch itself pickles
# (``Process`` arguments, the standard library's queues), not to what goes through the
# slab; these hand the call to torch, imported only when one of them is called.
def set_sharing_strategy(new_strategy: str) -> None:
    import torch.multiprocessing

    torch.multiprocessing.set_sharing_strategy(new_strategy)


def get_sharing_strategy() -> str:
    import torch.multiprocessing

    return torch.multiprocessing.get_sharing_strategy()


def get_all_sharing_strategies() -> set[str]:
    import torch.multiprocessing

    return torch.multiprocessing.get_all_sharing_strategies()


__all__ = [
    "Connection",
    "JoinableQueue",
    "Pipe",
    "Pool",
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "Queue",
    "SimpleQueue",
    "get_all_sharing_strategies",
    "get_context",
    "get_sharing_strategy",
    "set_sharing_strategy",
    "spawn",
    "start_processes",
]
__all__ += [name for name in multiprocessing.__all__ if name not in __all__]
