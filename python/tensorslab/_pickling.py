"""The pickler of channel messages: ``multiprocessing``'s, without torch's tensor reducers.

What the encoder cannot encode natively it pickles (protocol 5, out-of-band buffers into
the slab). For a message between processes that pickler must be ``ForkingPickler``, as
``multiprocessing.Queue`` uses: it knows how to send a ``Connection``, a socket or a
``multiprocessing`` lock to another process (duplicating the descriptor for the receiver),
which plain ``pickle.dumps`` would send as a bare descriptor number that means something
else, or nothing, over there.

Torch registers its reducers in the same table when ``torch.multiprocessing`` is imported
(the DataLoader imports it). Those would move every tensor found inside a pickled object
into a shared-memory file of its own, passed by descriptor from a thread of the sender:
one descriptor per tensor ("too many open files"), and a message no one can read once its
sender exits. Those entries are left out, so such a tensor pickles by its own
``__reduce_ex__``, as before. Tensors given to ``tensorslab.share`` still travel as
references: that reducer is ``ForkingPickler.reducer_override``, which this class inherits.
"""

from __future__ import annotations

import io
from multiprocessing.reduction import ForkingPickler
from typing import Any, Callable


def _is_torch_type(cls: type) -> bool:
    return getattr(cls, "__module__", "").partition(".")[0] == "torch"


class _ChannelPickler(ForkingPickler):
    def __init__(self, file: io.BytesIO, protocol: int, buffer_callback: Callable | None):
        # ForkingPickler.__init__ takes positional arguments only (file, protocol,
        # fix_imports, buffer_callback), before Python 3.12.
        super().__init__(file, protocol, True, buffer_callback)
        # Only the reducers torch registered with ForkingPickler go; torch's copyreg
        # entries (for torch.layout, torch.dtype, ...) are what plain pickle uses too.
        table = self._copyreg_dispatch_table.copy()
        table.update(
            (cls, reduce)
            for cls, reduce in self._extra_reducers.items()
            if not _is_torch_type(cls)
        )
        self.dispatch_table = table


def dumps(obj: Any, protocol: int = 5, buffer_callback: Callable | None = None) -> bytes:
    """``pickle.dumps(obj, protocol, buffer_callback=...)`` with the pickler above."""
    buffer = io.BytesIO()
    _ChannelPickler(buffer, protocol, buffer_callback).dump(obj)
    return buffer.getvalue()
