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
from ._tensorslab import Receiver, Sender, channel, dumps, loads
from .exceptions import (
    Closed,
    DecodeError,
    Empty,
    EncodeError,
    Full,
    IncompatibleError,
    PeerGone,
    ShmError,
    TensorslabError,
)
from .queue import Queue

__version__ = _tensorslab.__version__

# A fork child inherits open handles: the hooks count them in the child's own process slot
# and keep the channel open between the fork and that registration (see channel/registry.rs).
os.register_at_fork(
    before=_tensorslab._before_fork,
    after_in_parent=_tensorslab._after_fork_in_parent,
    after_in_child=_tensorslab._after_fork_in_child,
)

__all__ = [
    "Closed",
    "DecodeError",
    "Empty",
    "EncodeError",
    "Full",
    "IncompatibleError",
    "PeerGone",
    "Queue",
    "Receiver",
    "Sender",
    "ShmError",
    "TensorslabError",
    "channel",
    "dumps",
    "loads",
]
