"""``tensorslab.Queue``: a drop-in for ``multiprocessing.Queue`` on one channel.

Every process holding the queue holds one sender and one receiver handle, so any of them
may put and get. Unlike ``multiprocessing.Queue`` there is no feeder thread: ``put``
copies the message into shared memory before it returns, so ``join_thread`` and
``cancel_join_thread`` have nothing to wait for.
"""

from __future__ import annotations

import types
from typing import Any

from ._tensorslab import Receiver, Sender, channel

#: Capacity used for ``maxsize <= 0`` ("unbounded"): the ring is sized once, up front.
UNBOUNDED_CAPACITY = 65536


def _past_is_now(timeout: float | None) -> float | None:
    """multiprocessing.Queue takes a negative timeout as one already past (``Empty`` or
    ``Full`` at once); the channel refuses it, so the queue clamps it."""
    return None if timeout is None else max(timeout, 0.0)


class Queue:
    """A process-shared FIFO queue with the interface of ``multiprocessing.Queue``.

    ``maxsize <= 0`` means up to 65,536 queued messages (the ring is fixed in size);
    memory is bounded by the slab, which grows on demand.
    """

    # `Queue[int]` in annotations evaluated at run time, as multiprocessing.queues.Queue.
    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, maxsize: int = 0, **channel_options: Any) -> None:
        capacity = maxsize if maxsize > 0 else UNBOUNDED_CAPACITY
        self._maxsize = maxsize
        self._closed = False
        self._tx, self._rx = channel(capacity, **channel_options)

    @classmethod
    def _from_handles(cls, maxsize: int, tx: Sender, rx: Receiver) -> Queue:
        queue = cls.__new__(cls)
        queue._maxsize, queue._tx, queue._rx = maxsize, tx, rx
        queue._closed = False
        return queue

    def __reduce__(self):
        return (Queue._from_handles, (self._maxsize, self._tx, self._rx))

    def _check_closed(self) -> None:
        # As multiprocessing.Queue: after close() this process may neither put nor get.
        if self._closed:
            raise ValueError(f"Queue {self!r} is closed")

    #: Whether this process has put (see ``empty``).
    _put_here = False

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        self._check_closed()
        self._put_here = True
        self._tx.put(obj, block, _past_is_now(timeout))

    def put_nowait(self, obj: Any) -> None:
        self._check_closed()
        self._put_here = True
        self._tx.put_nowait(obj)

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        self._check_closed()
        return self._rx.get(block, _past_is_now(timeout))

    def get_nowait(self) -> Any:
        self._check_closed()
        return self._rx.get_nowait()

    def qsize(self) -> int:
        return self._rx.qsize()

    def empty(self) -> bool:
        # multiprocessing.Queue.close() closes the reader once this process has put (its
        # feeder thread started), so empty() raises then; before any put it still answers.
        if self._closed and self._put_here:
            raise OSError(f"{self!r}: handle is closed")
        return self.qsize() == 0

    def full(self) -> bool:
        return self._maxsize > 0 and self.qsize() >= self._maxsize

    def close(self) -> None:
        """No more puts or gets from this process (both raise ``ValueError``, as with
        ``multiprocessing.Queue``); its sender handle closes. Copies of the queue in other
        processes keep working."""
        self._closed = True
        self._tx.close()

    def join_thread(self) -> None:
        """Nothing to join: ``put`` has finished writing when it returns."""

    def cancel_join_thread(self) -> None:
        """Nothing to cancel: there is no feeder thread."""

    def __repr__(self) -> str:
        return f"<tensorslab.Queue maxsize={self._maxsize} qsize={self.qsize()}>"

    # ---- asyncio (see tensorslab._aio) ----

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """``put`` without blocking the event loop: awaits room (``Full`` after
        ``timeout``)."""
        self._check_closed()
        self._put_here = True
        await self._tx.put_async(obj, _past_is_now(timeout))

    async def get_async(self, timeout: float | None = None) -> Any:
        """``get`` without blocking the event loop (``Empty`` after ``timeout``); a
        cancelled call leaves the message queued."""
        self._check_closed()
        return await self._rx.get_async(_past_is_now(timeout))

    def __aiter__(self) -> Queue:
        return self

    async def __anext__(self) -> Any:
        """``async for msg in queue``: ends once every sender has closed and it is empty."""
        self._check_closed()
        return await self._rx.__anext__()
