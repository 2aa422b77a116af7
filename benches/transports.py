"""The transports the benchmark compares, each a small picklable class.

A transport is created in the parent (``open`` makes one pair of endpoints per case), pickled
into a producer and a consumer process started with ``spawn``, and driven there by
``harness.py`` through the same few methods, so the measuring loop is written once:

    producer: make_message -> send ... send(None) -> sender_stats -> close_send
    consumer: recv -> touch -> release ... recv() is None -> receiver_stats -> close_recv

Every ``send``/``recv`` takes a timeout and raises :class:`TransportTimeout` with the transport
and the wait in its message; ``mp.Pipe.send`` cannot time out, so the parent's watchdog in
``harness.py`` ends a producer stuck there.
"""

from __future__ import annotations

import pickle
import queue
from typing import Any

from payloads import PAGE, fill_pages, map_arrays, size_of


class TransportTimeout(RuntimeError):
    pass


class Transport:
    name = ""
    description = ""
    local = False  # True: one process, no producer/consumer pair (memcpy)

    def form_for(self, case: str) -> str:
        """``numpy`` or ``torch``: which form of the case's payload the producer sends."""
        return "numpy"

    def init_process(self) -> None:
        """Runs first in every child process."""

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        """A connected ``(send_end, recv_end)`` for messages of about ``nbytes``."""
        raise NotImplementedError

    def close_parent(self, send_end: Any, recv_end: Any) -> None:
        """The parent's copies of the endpoints, once both children have started."""

    def make_message(self, send_end: Any, step: int, payload: Any) -> Any:
        return {"step": step, "data": payload}

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        raise NotImplementedError

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        """``(message, token)``; the consumer drops the message, then calls ``release(token)``."""
        raise NotImplementedError

    def release(self, token: Any) -> None:
        pass

    def close_send(self, send_end: Any) -> None:
        pass

    def close_recv(self, recv_end: Any) -> None:
        pass

    def sender_stats(self, send_end: Any) -> dict | None:
        return None

    def receiver_stats(self, recv_end: Any) -> dict | None:
        return None

    def _timeout(self, action: str, timeout: float) -> TransportTimeout:
        return TransportTimeout(f"{self.name}: {action} did not complete within {timeout:.0f} s")


class Tensorslab(Transport):
    name = "tensorslab"
    description = "tensorslab.channel, copying put(msg); get() returns views into the slab"

    def form_for(self, case: str) -> str:
        return "numpy" if size_of(case) is not None else "torch"

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        import tensorslab

        if nbytes > 4 << 30:
            # Room for one message: with the default limit a second 8 GiB message could be
            # written while the consumer still reads the first, and this machine has 24 GiB.
            return tensorslab.channel(capacity=capacity, max_slab_bytes=nbytes + (256 << 20))
        return tensorslab.channel(capacity=capacity)

    def close_parent(self, send_end: Any, recv_end: Any) -> None:
        send_end.close()
        recv_end.close()

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        import tensorslab

        try:
            send_end.put(msg, timeout=timeout)
        except tensorslab.Full:
            raise self._timeout("put", timeout) from None

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        import tensorslab

        try:
            return recv_end.get(timeout=timeout), None
        except tensorslab.Empty:
            raise self._timeout("get", timeout) from None

    def close_send(self, send_end: Any) -> None:
        send_end.close()

    def close_recv(self, recv_end: Any) -> None:
        recv_end.close()

    def sender_stats(self, send_end: Any) -> dict | None:
        # Final figures: wait until the consumer has taken and released everything.
        send_end.wait_for_all_ack(timeout=30)
        return dict(send_end.stats())

    def receiver_stats(self, recv_end: Any) -> dict | None:
        return dict(recv_end.stats())


class TensorslabAlloc(Tensorslab):
    name = "tensorslab-alloc"
    description = (
        "tensorslab zero-copy path: buf = tx.alloc(shape, dtype), producer writes 1 byte per "
        "4 KiB page of buf (a cheap stand-in for filling it), put(buf) copies nothing"
    )

    def make_message(self, send_end: Any, step: int, payload: Any) -> Any:
        def alloc_like(array: Any) -> Any:
            buf = send_end.alloc(tuple(array.shape), array.dtype)
            fill_pages(buf, step)
            return buf

        return {"step": step, "data": map_arrays(payload, alloc_like)}


class MpQueue(Transport):
    name = "mp.Queue"
    description = "multiprocessing.Queue(maxsize=capacity), numpy arrays pickled in-band"

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        q = ctx.Queue(maxsize=capacity)
        return q, q

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        try:
            send_end.put(msg, timeout=timeout)
        except queue.Full:
            raise self._timeout("put", timeout) from None

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        try:
            return recv_end.get(timeout=timeout), None
        except queue.Empty:
            raise self._timeout("get", timeout) from None

    def close_send(self, send_end: Any) -> None:
        send_end.close()
        send_end.join_thread()


class MpPipe(Transport):
    name = "mp.Pipe"
    description = "multiprocessing.Pipe(duplex=False), numpy arrays pickled in-band"

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        reader, writer = ctx.Pipe(duplex=False)
        return writer, reader

    def close_parent(self, send_end: Any, recv_end: Any) -> None:
        # Otherwise a producer whose consumer died blocks on a pipe the parent keeps open.
        send_end.close()
        recv_end.close()

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        send_end.send(msg)

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        if not recv_end.poll(timeout):
            raise self._timeout("recv", timeout)
        return recv_end.recv(), None

    def close_send(self, send_end: Any) -> None:
        send_end.close()

    def close_recv(self, recv_end: Any) -> None:
        recv_end.close()


class TorchQueue(MpQueue):
    """``torch.multiprocessing`` queue with one sharing strategy set in both processes.

    Each message carries tensors with a storage torch has not shared before, as a freshly
    computed tensor would. Sending the same tensor twice would be free after the first time:
    torch moves a shared tensor's storage into shared memory in place and from then on sends
    only a handle. ``torch.from_numpy(t.numpy())`` gives a new storage over the same bytes
    (microseconds, no copy), so torch pays its real cost: one copy into a new segment.
    """

    def __init__(self, strategy: str) -> None:
        self.strategy = strategy
        self.name = f"torch.mp.Queue[{strategy}]"
        self.description = (
            f"torch.multiprocessing Queue, sharing strategy {strategy!r}, tensors with fresh "
            "storage each message"
        )

    def form_for(self, case: str) -> str:
        return "torch"

    def init_process(self) -> None:
        import torch.multiprocessing

        torch.multiprocessing.set_sharing_strategy(self.strategy)

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        import torch.multiprocessing

        q = torch.multiprocessing.get_context("spawn").Queue(maxsize=capacity)
        return q, q

    def make_message(self, send_end: Any, step: int, payload: Any) -> Any:
        import torch

        return {"step": step, "data": map_arrays(payload, lambda t: torch.from_numpy(t.numpy()))}


class ShmPerMessage(MpQueue):
    """A new ``multiprocessing.shared_memory.SharedMemory`` per message, what most shared-memory
    queue libraries do: the message is pickled with protocol 5, its out-of-band buffers copied
    into the segment, and only the segment's name, the pickle header and the buffer layout go
    through an ``mp.Queue``. The consumer attaches, unpickles onto views of the segment,
    touches, then closes and unlinks it."""

    name = "shm-per-message"
    description = (
        "fresh SharedMemory per message (pickle protocol 5, buffers copied in), name sent over "
        "mp.Queue; consumer attaches, touches, closes, unlinks"
    )

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        if msg is None:
            return super().send(send_end, None, timeout)
        from multiprocessing import shared_memory

        buffers: list[pickle.PickleBuffer] = []
        header = pickle.dumps(msg, protocol=5, buffer_callback=buffers.append)
        raws = [b.raw() for b in buffers]
        layout, offset = [], 0
        for raw in raws:
            layout.append((offset, raw.nbytes))
            offset += -(-raw.nbytes // 64) * 64
        segment = shared_memory.SharedMemory(create=True, size=max(offset, PAGE))
        try:
            for raw, (start, nbytes) in zip(raws, layout):
                segment.buf[start : start + nbytes] = raw
            super().send(send_end, (segment.name, header, layout), timeout)
        except BaseException:
            segment.unlink()
            raise
        finally:
            del raws, buffers
            segment.close()

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        item, _ = super().recv(recv_end, timeout)
        if item is None:
            return None, None
        from multiprocessing import shared_memory

        name, header, layout = item
        segment = shared_memory.SharedMemory(name=name)
        views = [segment.buf[start : start + nbytes] for start, nbytes in layout]
        return pickle.loads(header, buffers=views), (segment, views)

    def release(self, token: Any) -> None:
        if token is None:
            return
        segment, views = token
        for view in views:
            view.release()
        segment.close()
        segment.unlink()


class PipeWakeFloor(MpPipe):
    """Latency reference only: 8 raw bytes (the timestamp) through a pipe, no pickling. Its
    one-way latency is about what this machine needs to wake a process blocked in the kernel
    (a futex wake can be somewhat cheaper): the scale against which to read the others."""

    name = "pipe-wake-floor"
    description = "8 raw bytes through a pipe: the machine's cost of waking a sleeping process"

    def send(self, send_end: Any, msg: Any, timeout: float) -> None:
        send_end.send_bytes(b"" if msg is None else msg["t"].to_bytes(8, "little"))

    def recv(self, recv_end: Any, timeout: float) -> tuple[Any, Any]:
        if not recv_end.poll(timeout):
            raise self._timeout("recv", timeout)
        raw = recv_end.recv_bytes()
        return ({"t": int.from_bytes(raw, "little")} if raw else None), None


class TensorslabBroadcast(Tensorslab):
    """Latency and CPU-while-blocked only: one subscriber of a broadcast channel, which waits
    on the same futex scheme as a channel's receiver (spin, then sleep)."""

    name = "tensorslab-broadcast"
    description = "tensorslab.broadcast, one subscriber: put(msg); get() returns read-only views"

    def open(self, ctx: Any, capacity: int, nbytes: int = 0) -> tuple[Any, Any]:
        import tensorslab

        return tensorslab.broadcast(depth=capacity)


class Memcpy(Transport):
    name = "memcpy"
    description = "warm single-process np.copyto of the same arrays into preallocated destinations"
    local = True


TRANSPORTS: dict[str, Transport] = {
    t.name: t
    for t in [
        Tensorslab(),
        TensorslabAlloc(),
        MpQueue(),
        MpPipe(),
        TorchQueue("file_descriptor"),
        TorchQueue("file_system"),
        ShmPerMessage(),
        Memcpy(),
    ]
}

# Not compared for throughput; run beside the latency measurements.
WAKE_FLOOR = PipeWakeFloor()
BROADCAST = TensorslabBroadcast()

# Short names accepted by --transports.
ALIASES = {
    "mp-queue": "mp.Queue",
    "mp-pipe": "mp.Pipe",
    "torch-fd": "torch.mp.Queue[file_descriptor]",
    "torch-fs": "torch.mp.Queue[file_system]",
    "shm": "shm-per-message",
}

TENSORSLAB = ("tensorslab", "tensorslab-alloc")


def resolve(name: str) -> Transport:
    name = ALIASES.get(name, name)
    if name not in TRANSPORTS:
        known = ", ".join(list(TRANSPORTS) + list(ALIASES))
        raise ValueError(f"unknown transport {name!r}; known: {known}")
    return TRANSPORTS[name]
