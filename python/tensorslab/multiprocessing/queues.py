"""``SimpleQueue`` and ``JoinableQueue`` on tensorslab channels.

Both behave as the standard library's classes of the same names (``multiprocessing.queues``)
but carry every message through one channel: arrays and tensors travel in the slab, other
values as the channel encodes them. Neither has a feeder thread: ``put`` has copied the
message into shared memory when it returns. ``SimpleQueue`` also keeps a pipe that holds
one byte per queued message: what its readers wait on, as on the standard library's.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import types
from multiprocessing import reduction
from typing import Any

from .._tensorslab import Receiver, Sender, channel
from ..exceptions import Closed, Empty
from ..queue import UNBOUNDED_CAPACITY, Queue
from .connection import OwedFrames


class _Reader:
    """``SimpleQueue._reader``: what ``multiprocessing.pool`` and ``concurrent.futures``
    use of a receiving ``Connection``. Its descriptor is the read end of the queue's pipe,
    which holds one byte per message on the channel (written after the message), so
    ``multiprocessing.connection.wait`` and ``poll`` see the queue readable; ``recv``
    reads one byte, then takes one message. A one-byte read is atomic, so any number of
    processes may ``recv`` at once without a lock; end-of-file once no writer is left."""

    def __init__(self, rx: Receiver, conn: multiprocessing.connection.Connection) -> None:
        self._rx, self._conn = rx, conn

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def fileno(self) -> int:
        return self._conn.fileno()

    def close(self) -> None:
        self._conn.close()
        self._rx.close()

    def poll(self, timeout: float | None = 0.0) -> bool:
        """True when a message is queued, waiting up to ``timeout`` (None: no limit)."""
        return self._conn.poll(timeout)

    def recv(self) -> Any:
        if not os.read(self._conn.fileno(), 1):
            raise EOFError(f"{self!r}: every process that could put has closed it")
        # Never waits: the message went on the channel before its byte on the pipe.
        return self._rx.get_nowait()


class _Writer:
    """``SimpleQueue._writer``: ``send`` puts the message on the channel, then its byte on
    the pipe. A byte whose write raised (a signal handler raising while the pipe is full)
    is owed and written before the next one, so no later message goes unannounced
    (``connection.OwedFrames``)."""

    def __init__(self, tx: Sender, conn: multiprocessing.connection.Connection) -> None:
        self._tx, self._conn = tx, conn
        self._bytes_owed = OwedFrames()

    @property
    def closed(self) -> bool:
        return self._conn.closed

    def close(self) -> None:
        self._conn.close()
        self._tx.close()

    def send(self, obj: Any) -> None:
        try:
            self._tx.put(obj)
        except Closed as error:
            raise BrokenPipeError(f"{self!r}: no process can get from this queue") from error
        self._bytes_owed.add()
        self._bytes_owed.write(self._write_byte)

    def _write_byte(self) -> None:
        os.write(self._conn.fileno(), b"\0")


class SimpleQueue:
    """``multiprocessing.SimpleQueue`` on a channel: ``put``, ``get``, ``empty``, ``close``.

    As with the standard library, ``get`` waits without a timeout and raises ``EOFError``
    once every process that could put has closed its queue or exited; ``put`` raises
    ``BrokenPipeError`` once no process can get; both raise ``OSError`` after ``close()``;
    ``_reader`` has a descriptor to wait on (``concurrent.futures`` waits on it). Unlike
    it, the queue may also be sent through other queues (not only to children): its pipe's
    descriptors are duplicated as ``multiprocessing`` duplicates a ``Connection``'s.
    """

    __class_getitem__ = classmethod(types.GenericAlias)

    def __init__(self, *, ctx: Any = None, **channel_options: Any) -> None:
        # ctx: accepted as multiprocessing.queues.SimpleQueue takes it; no lock is needed.
        tx, rx = channel(UNBOUNDED_CAPACITY, **channel_options)
        reader, writer = multiprocessing.connection.Pipe(duplex=False)
        self._attach(tx, rx, reader, writer)

    def _attach(self, tx: Sender, rx: Receiver, reader, writer) -> None:
        self._tx, self._rx = tx, rx
        self._reader, self._writer = _Reader(rx, reader), _Writer(tx, writer)

    @classmethod
    def _from_handles(cls, tx: Sender, rx: Receiver, reader_fd, writer_fd) -> SimpleQueue:
        queue = cls.__new__(cls)
        reader = multiprocessing.connection.Connection(reader_fd.detach(), writable=False)
        writer = multiprocessing.connection.Connection(writer_fd.detach(), readable=False)
        queue._attach(tx, rx, reader, writer)
        return queue

    def __reduce__(self):
        descriptors = []
        for end in (self._reader, self._writer):
            end._conn._check_closed()
            descriptors.append(reduction.DupFd(end._conn.fileno()))
        return (SimpleQueue._from_handles, (self._tx, self._rx, *descriptors))

    def put(self, obj: Any) -> None:
        if self._writer.closed:
            raise OSError(f"{self!r}: handle is closed")
        self._writer.send(obj)

    def get(self) -> Any:
        if self._reader.closed:
            raise OSError(f"{self!r}: handle is closed")
        return self._reader.recv()

    def empty(self) -> bool:
        if self._reader.closed:
            raise OSError(f"{self!r}: handle is closed")
        return not self._reader.poll()

    def close(self) -> None:
        """Closes this process's ends; copies in other processes keep working."""
        self._reader.close()
        self._writer.close()

    def _get_nowait(self) -> Any:
        if not self._reader.poll():
            raise Empty("the queue is empty")
        return self._reader.recv()

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
