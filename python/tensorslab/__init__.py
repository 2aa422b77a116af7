"""tensorslab: move tensors and arrays between processes through recycled shared memory."""

from __future__ import annotations

from . import _tensorslab
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

__version__ = _tensorslab.__version__

__all__ = [
    "Closed",
    "DecodeError",
    "Empty",
    "EncodeError",
    "Full",
    "IncompatibleError",
    "PeerGone",
    "ShmError",
    "TensorslabError",
]
