"""The transports ``small.py`` compares: tensorslab, ``mp.Queue`` and the real peers from PyPI.

Each is a small picklable class: ``open`` runs in the parent and returns a picklable handle
(or raises :class:`Unsupported` with the reason); ``sender(handle)`` and ``receiver(handle)``
run in the child processes and return endpoints with ``put(array, timeout) -> bool`` and
``get(timeout) -> array | None`` (``False``/``None``: the wait timed out). Messages are numpy
``uint8`` arrays. The peers are installed only in ``.venv-bench`` (``make bench-env``); one
that is not installed reports why instead of a figure. The adapters are ours, written from
each peer's documented API.
"""

from __future__ import annotations

import importlib.util
import multiprocessing as mp
import os
import queue
import time
import uuid
from typing import Any

import numpy as np

CTX = mp.get_context("spawn")


class Unsupported(Exception):
    """The transport cannot do this case; the message says why."""


class Peer:
    name = ""
    module = ""  # import name: the peer is "not installed" when it cannot be found
    config = ""  # how it is configured, printed with the results
    multi_producer = True
    multi_consumer = True

    def missing(self) -> str | None:
        if self.module and importlib.util.find_spec(self.module) is None:
            return f"not installed (pip package for `{self.module}`; `make bench-env`)"
        return None

    def open(self, nbytes: int, capacity: int, producers: int = 1, consumers: int = 1) -> Any:
        if producers > 1 and not self.multi_producer:
            raise Unsupported("single producer by design")
        if consumers > 1 and not self.multi_consumer:
            raise Unsupported("single consumer by design")
        return self._open(nbytes, capacity)

    def _open(self, nbytes: int, capacity: int) -> Any:
        raise NotImplementedError

    def close(self, handle: Any) -> None:
        pass

    def sender(self, handle: Any) -> Any:
        raise NotImplementedError

    def receiver(self, handle: Any) -> Any:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------


class Tensorslab(Peer):
    name = "tensorslab"
    module = "tensorslab"
    config = "channel(capacity), copying put(array), get() returns a view into the slab"

    def __init__(self, spin_us: int | None = None) -> None:
        self.spin_us = spin_us
        if spin_us is not None:
            self.name = f"tensorslab spin_us={spin_us}"

    def _open(self, nbytes: int, capacity: int) -> Any:
        import tensorslab

        kwargs: dict[str, Any] = {}
        if nbytes > 1 << 30:
            kwargs["max_slab_bytes"] = capacity * nbytes + (256 << 20)
        if self.spin_us is not None:
            kwargs["spin_us"] = self.spin_us
        try:
            return tensorslab.channel(capacity=capacity, **kwargs)
        except TypeError as error:
            raise Unsupported(f"channel() does not accept spin_us yet ({error})") from None

    def close(self, handle: Any) -> None:
        for end in handle:
            end.close()

    def sender(self, handle: Any) -> Any:
        return _TensorslabSend(handle[0])

    def receiver(self, handle: Any) -> Any:
        return _TensorslabRecv(handle[1])


class _TensorslabSend:
    def __init__(self, tx: Any) -> None:
        import tensorslab

        self.tx, self.full = tx, tensorslab.Full

    def put(self, array: np.ndarray, timeout: float) -> bool:
        try:
            self.tx.put(array, timeout=timeout)
        except self.full:
            return False
        return True


class _TensorslabRecv:
    def __init__(self, rx: Any) -> None:
        import tensorslab

        self.rx, self.empty = rx, tensorslab.Empty

    def get(self, timeout: float) -> Any:
        try:
            return self.rx.get(timeout=timeout)
        except self.empty:
            return None


class TensorslabBatch(Tensorslab):
    """The batch calls, as faster-fifo's users call its ``get_many``: the producer puts 8
    messages per ``put_many``, the consumer takes up to 8 per ``get_many``."""

    name = "tensorslab batched"
    config = "channel(capacity), put_many of 8 arrays, get_many(8); views into the slab"
    batch = 8

    def sender(self, handle: Any) -> Any:
        return _TensorslabBatchSend(handle[0], self.batch)

    def receiver(self, handle: Any) -> Any:
        return _TensorslabBatchRecv(handle[1], self.batch)


class _TensorslabBatchSend(_TensorslabSend):
    def __init__(self, tx: Any, batch: int) -> None:
        super().__init__(tx)
        self.batch, self.pending = batch, []

    def put(self, array: np.ndarray, timeout: float) -> bool:
        self.pending.append(array)
        if len(self.pending) < self.batch:
            return True
        try:
            self.tx.put_many(self.pending, timeout=timeout)
        except self.full as error:
            del self.pending[: getattr(error, "sent", 0)]
            return False
        self.pending = []
        return True


class _TensorslabBatchRecv(_TensorslabRecv):
    def __init__(self, rx: Any, batch: int) -> None:
        super().__init__(rx)
        self.batch, self.pending = batch, []

    def get(self, timeout: float) -> Any:
        if not self.pending:
            try:
                self.pending = self.rx.get_many(self.batch, timeout=timeout)
            except self.empty:
                return None
            self.pending.reverse()
        return self.pending.pop()


# ---------------------------------------------------------------------------------------------


class MpQueue(Peer):
    name = "mp.Queue"
    config = "multiprocessing (spawn) Queue(maxsize=capacity); pickles each array"

    def _open(self, nbytes: int, capacity: int) -> Any:
        return CTX.Queue(maxsize=capacity)

    def close(self, handle: Any) -> None:
        handle.close()
        handle.cancel_join_thread()

    def sender(self, handle: Any) -> Any:
        return _QueueLike(handle, queue.Full, queue.Empty)

    def receiver(self, handle: Any) -> Any:
        return _QueueLike(handle, queue.Full, queue.Empty)


class _QueueLike:
    def __init__(self, q: Any, full: type, empty: type) -> None:
        self.q, self.full, self.empty = q, full, empty

    def put(self, array: np.ndarray, timeout: float) -> bool:
        try:
            self.q.put(array, timeout=timeout)
        except self.full:
            return False
        return True

    def get(self, timeout: float) -> Any:
        try:
            return self.q.get(timeout=timeout)
        except self.empty:
            return None


# ---------------------------------------------------------------------------------------------


class FasterFifo(Peer):
    name = "faster-fifo"
    module = "faster_fifo"
    config = (
        "faster_fifo.Queue(max_size_bytes = capacity x message, >= 1 MiB), put(array); the "
        "consumer takes get_many(max_messages_to_get=capacity), the call its docs recommend "
        "for throughput, and hands the messages out one by one"
    )

    def _open(self, nbytes: int, capacity: int) -> Any:
        import faster_fifo

        return faster_fifo.Queue(max_size_bytes=max(1 << 20, capacity * (nbytes + 512)))

    def close(self, handle: Any) -> None:
        handle.close()

    def sender(self, handle: Any) -> Any:
        return _QueueLike(handle, queue.Full, queue.Empty)

    def receiver(self, handle: Any) -> Any:
        return _FasterFifoRecv(handle)


class _FasterFifoRecv:
    def __init__(self, q: Any) -> None:
        self.q, self.pending = q, []
        self.batch = 8

    def get(self, timeout: float) -> Any:
        if not self.pending:
            try:
                self.pending = self.q.get_many(timeout=timeout, max_messages_to_get=self.batch)
            except queue.Empty:
                return None
            self.pending.reverse()
        return self.pending.pop()


# ---------------------------------------------------------------------------------------------


class Dejaq(Peer):
    name = "dejaq"
    module = "dejaq"
    config = "dejaq.DejaQueue(buffer_bytes = capacity x message, >= 1 MiB), put/get"

    def _open(self, nbytes: int, capacity: int) -> Any:
        from dejaq import DejaQueue

        return DejaQueue(buffer_bytes=max(1 << 20, capacity * (nbytes + 4096)))

    def sender(self, handle: Any) -> Any:
        return _DejaqEnd(handle)

    def receiver(self, handle: Any) -> Any:
        return _DejaqEnd(handle)


class _DejaqEnd:
    def __init__(self, q: Any) -> None:
        self.q = q

    def put(self, array: np.ndarray, timeout: float) -> bool:
        try:
            return self.q.put(array, timeout=timeout) is not False
        except TimeoutError:
            return False

    def get(self, timeout: float) -> Any:
        try:
            return self.q.get(timeout=timeout)
        except (TimeoutError, queue.Empty):
            return None


# ---------------------------------------------------------------------------------------------


class PySharedMemory(Peer):
    name = "py-sharedmemory"
    module = "py_sharedmemory"
    config = "create_shared_memory_pair(capacity=capacity, ctx=spawn), put/get"
    multi_producer = False  # its docs: "One process may produce; many may consume"

    def _open(self, nbytes: int, capacity: int) -> Any:
        from py_sharedmemory import create_shared_memory_pair

        return create_shared_memory_pair(capacity=capacity, ctx=CTX)

    def close(self, handle: Any) -> None:
        handle[0].close()

    def sender(self, handle: Any) -> Any:
        return _QueueLike(handle[0], queue.Full, queue.Empty)

    def receiver(self, handle: Any) -> Any:
        return _PySharedMemoryRecv(handle[1])


class _PySharedMemoryRecv(_QueueLike):
    def __init__(self, rx: Any) -> None:
        super().__init__(rx, queue.Full, queue.Empty)

    def get(self, timeout: float) -> Any:
        try:
            return self.q.get(timeout=timeout)
        except (queue.Empty, TimeoutError):
            return None


# ---------------------------------------------------------------------------------------------


class Iceoryx2(Peer):
    name = "iceoryx2"
    module = "iceoryx2"
    config = (
        "Ipc pub/sub of Slice[c_uint8]: subscriber_max_buffer_size = max_borrowed = capacity "
        "(8 in flight), safe overflow off, publisher backpressure RetryUntilDelivered, "
        "initial_max_slice_len = message size; loan_slice_uninit + one copy in, the "
        "consumer polls receive() (pub/sub has no blocking receive) and reads the sample "
        "in place; warm-up messages fault the segment in before the window"
    )
    multi_producer = False  # its services take several publishers, but not wired up here
    multi_consumer = False

    def _open(self, nbytes: int, capacity: int) -> Any:
        return {
            "service": f"tensorslab-bench-{uuid.uuid4().hex[:12]}",
            "nbytes": nbytes,
            "capacity": capacity,
        }

    def _service(self, handle: dict) -> tuple[Any, Any]:
        import ctypes

        import iceoryx2 as iox2

        iox2.set_log_level(iox2.LogLevel.Error)
        node = iox2.NodeBuilder.new().create(iox2.ServiceType.Ipc)
        service = (
            node.service_builder(iox2.ServiceName.new(handle["service"]))
            .publish_subscribe(iox2.Slice[ctypes.c_uint8])
            .subscriber_max_buffer_size(handle["capacity"])
            .subscriber_max_borrowed_samples(handle["capacity"])
            .history_size(0)
            .enable_safe_overflow(False)
            .max_publishers(1)
            .max_subscribers(1)
            .open_or_create()
        )
        return node, service

    def sender(self, handle: Any) -> Any:
        import iceoryx2 as iox2

        node, service = self._service(handle)
        publisher = (
            service.publisher_builder()
            .initial_max_slice_len(max(1, handle["nbytes"]))
            .allocation_strategy(iox2.AllocationStrategy.PowerOfTwo)
            .backpressure_strategy(iox2.BackpressureStrategy.RetryUntilDelivered)
            .max_loaned_samples(2)
            .create()
        )
        return _IceoryxSend(node, service, publisher)

    def receiver(self, handle: Any) -> Any:
        node, service = self._service(handle)
        subscriber = service.subscriber_builder().buffer_size(handle["capacity"]).create()
        return _IceoryxRecv(node, service, subscriber)


class _IceoryxSend:
    def __init__(self, node: Any, service: Any, publisher: Any) -> None:
        self.node, self.service, self.publisher = node, service, publisher

    def put(self, array: np.ndarray, timeout: float) -> bool:
        sample = self.publisher.loan_slice_uninit(array.nbytes)
        view = np.frombuffer(sample.payload().as_memory_view(), np.uint8, array.nbytes)
        view[:] = array.reshape(-1).view(np.uint8)
        sample.assume_init().send()
        return True


class _IceoryxRecv:
    def __init__(self, node: Any, service: Any, subscriber: Any) -> None:
        self.node, self.service, self.subscriber = node, service, subscriber

    def get(self, timeout: float) -> Any:
        deadline = time.perf_counter() + timeout
        while True:
            sample = self.subscriber.receive()
            if sample is not None:
                view = np.frombuffer(sample.payload().as_memory_view(), np.uint8)
                return _Held(view, sample)
            if time.perf_counter() > deadline:
                return None
            os.sched_yield()


class _Held:
    """A view into a peer's sample, keeping the sample (and its loan) alive while used."""

    __slots__ = ("array", "sample")

    def __init__(self, array: np.ndarray, sample: Any) -> None:
        self.array, self.sample = array, sample


# ---------------------------------------------------------------------------------------------


class Spdl(Peer):
    name = "spdl"
    module = "spdl"

    def missing(self) -> str | None:
        return super().missing() or (
            "no public cross-process path: its SharedMemorySegmentPool lives in the private "
            "spdl.pipeline._arena, used inside spdl's own subprocess pipeline; the public "
            "API moves data between pipeline stages, not between two processes we start"
        )


class InterProcessPyObjects(Peer):
    name = "InterProcessPyObjects"
    module = "ipc_py_objects"

    def missing(self) -> str | None:
        if reason := super().missing():
            return reason
        try:
            import ipc_py_objects.versions.v_2  # noqa: F401
        except Exception as error:  # noqa: BLE001 - whatever breaks its import is the reason
            return f"installed, but its import fails: {type(error).__name__}: {error}"
        return (
            "adapter not written yet: its message exchange is the asyncio shared-memory "
            "manager (an event loop in each process), which this loop does not host"
        )


def all_peers() -> list[Peer]:
    return [
        Tensorslab(),
        TensorslabBatch(),
        MpQueue(),
        Iceoryx2(),
        FasterFifo(),
        Dejaq(),
        Spdl(),
        PySharedMemory(),
        InterProcessPyObjects(),
    ]


def array_of(message: Any) -> np.ndarray:
    return message.array if isinstance(message, _Held) else message
