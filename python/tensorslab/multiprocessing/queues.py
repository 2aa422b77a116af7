"""``SimpleQueue`` and ``JoinableQueue`` on tensorslab channels.

Both behave as the standard library's classes of the same names (``multiprocessing.queues``)
but carry every message through one channel: arrays and tensors travel in the slab, other
values as the channel encodes them. Neither has a feeder thread: ``put`` has copied the
message into shared memory when it returns.
"""

from __future__ import annotations

import multiprocessing
from typing import Any

from .._tensorslab import Receiver, Sender, channel
from ..exceptions import Closed
from ..queue import UNBOUNDED_CAPACITY, Queue


class _Reader:
    """``SimpleQueue._reader``: the part of a receiving ``Connection`` that
    ``multiprocessing.pool`` touches (a worker closes its copy; the result handler polls)."""

    def __init__(self, rx: Receiver) -> None:
        self._rx = rx

    @property
    def closed(self) -> bool:
        return self._rx.closed

    def close(self) -> None:
        self._rx.close()

    def poll(self) -> bool:
        """True when a message is queued (no wait)."""
        return not self._rx.closed and self._rx.qsize() > 0


class _Writer:
    """``SimpleQueue._writer``: a worker of ``multiprocessing.pool`` closes its copy, so that
    only the pool's own process keeps the task queue open."""

    def __init__(self, tx: Sender) -> None:
        self._tx = tx

    @property
    def closed(self) -> bool:
        return self._tx.closed

    def close(self) -> None:
        self._tx.close()


class SimpleQueue:
    """``multiprocessing.SimpleQueue`` on a channel: ``put``, ``get``, ``empty``, ``close``.

    As with the standard library, ``get`` waits without a timeout and raises ``EOFError``
    once every process that could put has closed its queue or exited; ``put`` raises
    ``BrokenPipeError`` once no process can get; both raise ``OSError`` after ``close()``.
    Unlike it, the queue may also be sent through other queues (not only to children).
    """

    def __init__(self, *, ctx: Any = None, **channel_options: Any) -> None:
        # ctx: accepted as multiprocessing.queues.SimpleQueue takes it; a channel needs none.
        tx, rx = channel(UNBOUNDED_CAPACITY, **channel_options)
        self._attach(tx, rx)

    def _attach(self, tx: Sender, rx: Receiver) -> None:
        self._tx, self._rx = tx, rx
        self._reader, self._writer = _Reader(rx), _Writer(tx)

    @classmethod
    def _from_handles(cls, tx: Sender, rx: Receiver) -> SimpleQueue:
        queue = cls.__new__(cls)
        queue._attach(tx, rx)
        return queue

    def __reduce__(self):
        return (SimpleQueue._from_handles, (self._tx, self._rx))

    def put(self, obj: Any) -> None:
        if self._tx.closed:
            raise OSError(f"{self!r}: handle is closed")
        try:
            self._tx.put(obj)
        except Closed as error:
            raise BrokenPipeError(f"{self!r}: no process can get from this queue") from error

    def get(self) -> Any:
        if self._rx.closed:
            raise OSError(f"{self!r}: handle is closed")
        try:
            return self._rx.get()
        except Closed as error:
            raise EOFError(f"{self!r}: every process that could put has closed it") from error

    def empty(self) -> bool:
        if self._rx.closed:
            raise OSError(f"{self!r}: handle is closed")
        return self._rx.qsize() == 0

    def close(self) -> None:
        """Closes this process's ends; copies in other processes keep working."""
        self._tx.close()
        self._rx.close()

    def _get_nowait(self) -> Any:
        return self._rx.get_nowait()

    def __repr__(self) -> str:
        return "<tensorslab.multiprocessing.SimpleQueue>"


class JoinableQueue(Queue):
    """``multiprocessing.JoinableQueue`` on a channel: a ``tensorslab.Queue`` that also counts
    unfinished tasks for ``task_done`` and ``join``.

    The count lives in a ``multiprocessing`` semaphore and condition (of ``ctx``, the
    default context if None), so as with the standard library the queue goes to children
    as a ``Process`` argument, not through another queue.
    """

    def __init__(self, maxsize: int = 0, *, ctx: Any = None, **channel_options: Any) -> None:
        super().__init__(maxsize, **channel_options)
        ctx = ctx if ctx is not None else multiprocessing.get_context()
        self._unfinished_tasks = ctx.Semaphore(0)
        self._cond = ctx.Condition()

    def __reduce__(self):
        state = (self._maxsize, self._tx, self._rx, self._unfinished_tasks, self._cond)
        return (_rebuild_joinable, state)

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        # Counted before the put, so a consumer that takes the message and calls task_done
        # at once never finds the count at zero; undone if the put fails. The condition is
        # not held across the put: a producer waiting for room must not keep consumers out
        # of task_done.
        self._check_closed()
        self._unfinished_tasks.release()
        try:
            super().put(obj, block, timeout)
        except BaseException:
            self._uncount()
            raise

    def put_nowait(self, obj: Any) -> None:
        self.put(obj, False)

    async def put_async(self, obj: Any, timeout: float | None = None) -> None:
        """``put`` without blocking the event loop, counted as ``put`` counts (a cancelled
        or failed call is uncounted: it published nothing)."""
        self._check_closed()
        self._unfinished_tasks.release()
        try:
            await super().put_async(obj, timeout)
        except BaseException:
            self._uncount()
            raise

    def _uncount(self) -> None:
        with self._cond:
            self._unfinished_tasks.acquire(False)
            if self._unfinished_tasks._semlock._is_zero():
                self._cond.notify_all()

    def task_done(self) -> None:
        with self._cond:
            if not self._unfinished_tasks.acquire(False):
                raise ValueError("task_done() called too many times")
            if self._unfinished_tasks._semlock._is_zero():
                self._cond.notify_all()

    def join(self, timeout: float | None = None) -> bool:
        """Wait until every item put has had its ``task_done``. ``timeout`` (an addition to
        the standard library's ``join()``): returns False if that has not happened in time."""
        with self._cond:
            return self._cond.wait_for(self._unfinished_tasks._semlock._is_zero, timeout)

    def __repr__(self) -> str:
        return f"<tensorslab.multiprocessing.JoinableQueue maxsize={self._maxsize}>"


def _rebuild_joinable(maxsize, tx, rx, unfinished_tasks, cond) -> JoinableQueue:
    queue = JoinableQueue._from_handles(maxsize, tx, rx)
    queue._unfinished_tasks, queue._cond = unfinished_tasks, cond
    return queue
