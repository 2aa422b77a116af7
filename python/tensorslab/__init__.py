"""tensorslab: move tensors and arrays between processes through recycled shared memory.

A sender copies each message once into a *slab* of shared memory that stays mapped and is
reused; only a small descriptor crosses the ring. The receiver gets zero-copy NumPy arrays
and torch tensors; when it drops the last of them, the memory returns to the slab.

>>> tx, rx = tensorslab.channel()
>>> tx.put({"obs": np.zeros((64, 84, 84), np.uint8), "step": 1})
>>> msg = rx.get()
"""

from __future__ import annotations

import os

from . import _tensorslab
from ._fork import handed_to_child
from ._share import share
from ._tensorslab import (
    Publisher,
    Reader,
    Receiver,
    Sender,
    Subscriber,
    Writer,
    broadcast,
    channel,
    dumps,
    latest,
    loads,
)
from .exceptions import (
    Closed,
    DecodeError,
    Empty,
    EncodeError,
    Full,
    IncompatibleError,
    LimitError,
    PeerGone,
    ShmError,
    TensorslabError,
)
from .queue import Queue

__version__ = _tensorslab.__version__


def _after_fork_in_child() -> None:
    _tensorslab._after_fork_in_child(handed_to_child())


# A fork child inherits open handles: the hooks register it in a process slot of its own,
# count the handles it was handed, and keep the channel open between the fork and that
# registration (see _fork.py and src/channel/registry.rs).
os.register_at_fork(
    before=_tensorslab._before_fork,
    after_in_parent=_tensorslab._after_fork_in_parent,
    after_in_child=_after_fork_in_child,
)

__all__ = [
    "Closed",
    "DecodeError",
    "Empty",
    "EncodeError",
    "Full",
    "IncompatibleError",
    "LimitError",
    "PeerGone",
    "ProcessPoolExecutor",
    "Publisher",
    "Queue",
    "Reader",
    "Receiver",
    "Sender",
    "ShmError",
    "Subscriber",
    "TensorslabError",
    "Writer",
    "broadcast",
    "channel",
    "dumps",
    "latest",
    "loads",
    "share",
]


def __getattr__(name: str):
    # tensorslab.ProcessPoolExecutor is imported on first use: it imports
    # concurrent.futures and multiprocessing, which `import tensorslab` need not pay for.
    if name == "ProcessPoolExecutor":
        from .executor import ProcessPoolExecutor

        return ProcessPoolExecutor
    raise AttributeError(f"module 'tensorslab' has no attribute {name!r}")
