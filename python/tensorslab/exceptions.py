"""The exception hierarchy of tensorslab.

Every error the library raises on purpose is a :class:`TensorslabError`. Classes that
mirror a standard-library condition also subclass it, so existing ``except`` clauses
keep working: ``Full``/``Empty`` are ``queue.Full``/``queue.Empty``, bad input is a
``TypeError`` or ``ValueError``.
"""

from __future__ import annotations

import queue

__all__ = [
    "TensorslabError",
    "Full",
    "Empty",
    "Closed",
    "PeerGone",
    "EncodeError",
    "DecodeError",
    "IncompatibleError",
    "LimitError",
    "ShmError",
]


class TensorslabError(Exception):
    """Base class of every error raised by tensorslab."""


class Full(TensorslabError, queue.Full):
    """The channel had no room for the message (ring full or slab exhausted) in time."""


class Empty(TensorslabError, queue.Empty):
    """No message arrived in time."""


class Closed(TensorslabError):
    """Every handle on the other side of the channel is closed, or its process exited."""


class PeerGone(Closed):
    """Every handle on the other side is gone and the last of them died without closing
    (their process was killed or crashed); a ``Closed``, so ``except Closed`` catches it."""


class EncodeError(TensorslabError, TypeError):
    """A value in the message cannot be sent; the message names the path to it."""


class DecodeError(TensorslabError, ValueError):
    """Bytes given to ``loads`` (or found in shared memory) do not follow the wire format."""


class IncompatibleError(TensorslabError):
    """The channel was created by another version of tensorslab, or its memory is corrupt."""


class LimitError(TensorslabError):
    """A fixed limit of the channel was reached: 256 processes attached at once, or 128
    handles pickled and not yet loaded by their new process."""


class ShmError(TensorslabError, OSError):
    """The operating system refused shared memory (reserving, mapping or attaching it)."""
