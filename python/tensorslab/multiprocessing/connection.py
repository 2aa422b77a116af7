"""``Pipe()`` whose ends carry objects through tensorslab channels.

Each end keeps a real ``multiprocessing`` connection underneath, so ``poll``, ``fileno``,
``multiprocessing.connection.wait``, ``send_bytes``/``recv_bytes`` and end-of-file behave
as the standard library's: the operating system's pipe is what signals. ``send(obj)`` puts
``obj`` on the channel towards the other end, *then* writes a one-byte frame on the pipe;
``recv()`` reads a frame and, for that one-byte frame, takes the next message from the
channel. A message is on the channel before its frame is readable, so ``recv`` never waits
on the channel; frames keep the pipe's order, and each frame takes exactly one message.
A send whose frame write raised (a signal handler raising while the pipe is full, a
non-blocking descriptor) leaves its message on the channel: its frame is owed, and written
before the next frame this end writes, so no later message is taken in its place (the
standard library's send, never written, delivers nothing; this one delivers late). A
sender killed between the two steps leaves one message without a frame: with no other
process sending on that end nobody receives it; if another one sends on it too, the
other's next frame takes the orphan, and that sender's messages each arrive one late.

Frames are tagged: ``o`` (an object on the channel) or ``b`` followed by the bytes of
``send_bytes``. As with the standard library, ``recv`` of bytes unpickles them and
``recv_bytes`` of an object returns it pickled.
"""

from __future__ import annotations

import multiprocessing.connection
import os
from multiprocessing import BufferTooShort, reduction
from typing import Any, Callable

from .._tensorslab import Receiver, Sender, channel
from ..exceptions import Closed

_OBJECT = b"o"
_BYTES = b"b"

#: Messages each direction's channel queues. The operating system's pipe holds fewer
#: one-byte frames than this, so a sender normally waits on the pipe, as with the standard
#: library; it waits on whichever is full.
PIPE_CAPACITY = 16384


class OwedFrames:
    """The frames of messages already on a channel and not yet written to the pipe: one
    entry per frame, added after the put and taken by whichever send writes it next, put
    back if that write raises. ``list.append`` and ``pop`` are atomic, so threads sending
    at once write each frame exactly once (a counter's ``+=`` raced: it went negative and
    a writer wrote frames until the pipe was full). An entry names the process that owes
    it: a fork child drops its parent's instead of writing them a second time."""

    def __init__(self) -> None:
        self._entries: list[int] = []

    def add(self) -> None:
        self._entries.append(os.getpid())

    def write(self, write_one: Callable[[], None]) -> None:
        """Writes every frame this process owes, with ``write_one``."""
        pid = os.getpid()
        while True:
            try:
                owner = self._entries.pop()
            except IndexError:
                return
            if owner != pid:
                continue
            try:
                write_one()
            except BaseException:
                self._entries.append(owner)
                raise


class Connection:
    """One end of a :func:`Pipe`: the interface of ``multiprocessing.connection.Connection``.

    Picklable: send it to a child as a ``Process`` argument or through a queue; the file
    descriptor is duplicated as ``multiprocessing`` duplicates its own connections.
    """

    def __init__(
        self,
        conn: multiprocessing.connection.Connection,
        tx: Sender | None,
        rx: Receiver | None,
    ) -> None:
        self._conn, self._tx, self._rx = conn, tx, rx
        self._frames_owed = OwedFrames()

    def __reduce__(self):
        conn = self._conn
        conn._check_closed()
        descriptor = reduction.DupFd(conn.fileno())
        return (_rebuild, (descriptor, conn.readable, conn.writable, self._tx, self._rx))

    # --- the standard library's interface -------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._conn.closed

    @property
    def readable(self) -> bool:
        return self._conn.readable

    @property
    def writable(self) -> bool:
        return self._conn.writable

    def fileno(self) -> int:
        return self._conn.fileno()

    def close(self) -> None:
        self._conn.close()
        for handle in (self._tx, self._rx):
            if handle is not None:
                handle.close()

    def poll(self, timeout: float | None = 0.0) -> bool:
        return self._conn.poll(timeout)

    def send(self, obj: Any) -> None:
        self._check_writable()
        assert self._tx is not None  # a writable end has a sender
        try:
            self._tx.put(obj)
        except Closed as error:
            raise BrokenPipeError(f"{self!r}: the other end is closed") from error
        self._frames_owed.add()
        self._frames_owed.write(self._write_object_frame)

    def recv(self) -> Any:
        frame = self._conn.recv_bytes()
        if frame == _OBJECT:
            return self._take()
        return reduction.ForkingPickler.loads(self._payload(frame))

    def send_bytes(self, buf: Any, offset: int = 0, size: int | None = None) -> None:
        self._check_writable()
        view = memoryview(buf)
        if view.itemsize > 1:
            view = view.cast("B")
        length = view.nbytes
        if offset < 0:
            raise ValueError("offset is negative")
        if length < offset:
            raise ValueError("buffer length < offset")
        if size is None:
            size = length - offset
        elif size < 0:
            raise ValueError("size is negative")
        elif offset + size > length:
            raise ValueError("buffer length < offset + size")
        self._frames_owed.write(self._write_object_frame)
        self._conn.send_bytes(_BYTES + view[offset : offset + size])

    def recv_bytes(self, maxlength: int | None = None) -> bytes:
        if maxlength is not None and maxlength < 0:
            raise ValueError("negative maxlength")
        # One more byte for the tag; the connection refuses a longer frame as it would.
        frame = self._conn.recv_bytes(None if maxlength is None else maxlength + 1)
        data = self._bytes_of(frame)
        if maxlength is not None and len(data) > maxlength:
            self._conn._bad_message_length()  # raises OSError, as for a long bytes frame
        return data

    def recv_bytes_into(self, buf: Any, offset: int = 0) -> int:
        with memoryview(buf) as target:
            target = target.cast("B")
            if offset < 0:
                raise ValueError("negative offset")
            if offset > target.nbytes:
                raise ValueError("offset too large")
            data = self._bytes_of(self._conn.recv_bytes())
            if target.nbytes < offset + len(data):
                raise BufferTooShort(data)
            target[offset : offset + len(data)] = data
            return len(data)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *args: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"fd {self._conn.fileno()}"
        return f"<tensorslab.multiprocessing.Connection {state}>"

    # --- frames ---------------------------------------------------------------------------

    def _check_writable(self) -> None:
        self._conn._check_closed()
        self._conn._check_writable()

    def _write_object_frame(self) -> None:
        self._conn.send_bytes(_OBJECT)

    def _take(self) -> Any:
        assert self._rx is not None  # a readable end has a receiver
        # Never waits: the sender put the message before it wrote the frame we just read.
        return self._rx.get_nowait()

    @staticmethod
    def _payload(frame: bytes) -> memoryview:
        if frame[:1] != _BYTES:
            raise OSError(f"not a frame of tensorslab.multiprocessing: starts with {frame[:1]!r}")
        return memoryview(frame)[1:]

    def _bytes_of(self, frame: bytes) -> bytes:
        if frame == _OBJECT:
            return bytes(reduction.ForkingPickler.dumps(self._take()))
        return bytes(self._payload(frame))


def _rebuild(descriptor, readable: bool, writable: bool, tx, rx) -> Connection:
    conn = multiprocessing.connection.Connection(descriptor.detach(), readable, writable)
    return Connection(conn, tx, rx)


def Pipe(duplex: bool = True, **channel_options: Any) -> tuple[Connection, Connection]:
    """Two connected ends, as ``multiprocessing.Pipe``: both read and write when ``duplex``,
    else ``(reader, writer)``. ``channel_options`` go to ``tensorslab.channel``."""
    first, second = multiprocessing.connection.Pipe(duplex)
    if not duplex:
        tx, rx = channel(PIPE_CAPACITY, **channel_options)
        return Connection(first, None, rx), Connection(second, tx, None)
    tx_forward, rx_forward = channel(PIPE_CAPACITY, **channel_options)
    tx_back, rx_back = channel(PIPE_CAPACITY, **channel_options)
    return Connection(first, tx_forward, rx_back), Connection(second, tx_back, rx_forward)
