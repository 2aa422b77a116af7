"""The compiled core of tensorslab (Rust). Import from ``tensorslab``, not from here."""

from typing import Any, AsyncIterator, Coroutine, Iterable, Iterator, TypeVar, final

from typing_extensions import disjoint_base

_H = TypeVar("_H", bound="Handle")


__all__ = [
    "ABI_VERSION",
    "AioWaker",
    "AioWatch",
    "Handle",
    "Lease",
    "Publisher",
    "Reader",
    "Receiver",
    "Sender",
    "SharedSegment",
    "Subscriber",
    "Writer",
    "__version__",
    "_after_fork_in_child",
    "_after_fork_in_parent",
    "_aio_after_fork_in_child",
    "_aio_serve",
    "_aio_try_latest",
    "_before_fork",
    "_drop_ticket",
    "_rebuild",
    "_rebuild_subscriber",
    "_share_attach",
    "_share_create",
    "_share_find",
    "_share_layout",
    "_share_live",
    "broadcast",
    "channel",
    "dumps",
    "latest",
    "loads",
]
__version__: str
ABI_VERSION: int

@disjoint_base
class Handle:
    """What both ends of a channel share. Not created directly."""

    @property
    def closed(self) -> bool:
        """True after :meth:`close` on this handle."""

    def qsize(self) -> int:
        """Messages queued and not yet taken (a snapshot)."""

    def close(self) -> None:
        """Stop counting this handle; further use raises ``ValueError``."""

    def stats(self) -> dict[str, int | float]:
        """Slab and traffic figures to log (see the README, "Statistics")."""

    def __enter__(self: _H) -> _H: ...
    def __exit__(self, *args: object) -> None: ...
    def __reduce__(self) -> tuple[Any, ...]: ...

@final
class Sender(Handle):
    """The sending end of a channel. Picklable: send it to child processes."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Copy ``obj`` into the slab and queue it.

        Raises ``tensorslab.Full`` when the ring stays full or the slab has no room within
        ``timeout`` (or at once with ``block=False``), ``tensorslab.Closed`` once every
        receiver has closed or exited, ``tensorslab.EncodeError`` for a value that cannot be
        sent (its message names the path inside ``obj``), and ``ValueError`` for a message
        larger than ``max_slab_bytes``. A failed put leaves nothing allocated.
        """

    def put_many(
        self, objs: Iterable[Any], block: bool = True, timeout: float | None = None
    ) -> None:
        """Put every object of ``objs`` in order, with one call for the batch.

        All are encoded first: one that cannot be raises ``tensorslab.EncodeError`` naming it
        (``objs[3]: ...``) and nothing is put. A ``tensorslab.Full`` (timeout, or no room with
        ``block=False``) comes after the messages before it were put: its ``sent`` attribute
        says how many.
        """

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""

    def put_async(self, obj: Any, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """``await put_async(obj)``: ``put`` without blocking the event loop.

        Awaits room as ``put`` waits for it, and raises what it raises (``Full`` after
        ``timeout``, ``Closed``). The event loop's thread is never blocked and no thread is
        started per call (see the README, "asyncio"). Cancelling it publishes nothing.
        """

    def has_space(self, nbytes: int = 0) -> bool:
        """True when a message with ``nbytes`` of payload could be put now without waiting."""

    def wait_for_all_ack(self, timeout: float | None = None) -> bool:
        """Wait until every message put by this process has been taken and released.

        Returns False on timeout or when no receiver is left to release them.
        """

    def alloc(
        self,
        shape: int | tuple[int, ...] | list[int] | Any,
        dtype: Any = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        """An uninitialised ``np.ndarray`` (NumPy dtype) or ``torch.Tensor`` (torch dtype) in
        slab memory. Fill it in place; putting it (alone or inside a container) sends it
        without copying. Do not modify it after putting it: the receiver sees the same memory.

        With no ``dtype``, ``shape`` is a *spec*: a nested dict, list, tuple, named tuple or
        dataclass instance whose leaves are ``(shape, dtype)`` pairs, e.g.
        ``{"obs": ((T, N, 4), torch.float32), "act": ((T, N), torch.int64)}``. The result has
        the same structure with an uninitialised array or tensor at each leaf, all in ONE
        slab block (a rollout chunk): putting it, any part of it, or C-contiguous slices of
        its arrays sends them with no copy, and the receiver gets zero-copy views of that
        block. A leaf is an exact ``tuple`` of two items whose second item is a dtype: a
        ``torch.dtype``, a ``np.dtype``, a type (``np.float32``) or a string
        (``"float32"``); every other tuple is a container. A bad spec allocates nothing and
        its error names the path (``spec['obs']: ...``).
        """

    def alloc_like(self, example: Any, *, timeout: float | None = None) -> Any:
        """``alloc`` of a spec with the structure, shapes and dtypes of ``example`` (a nested
        structure of arrays and tensors, as ``alloc`` takes); values are not copied."""


@final
class Receiver(Handle):
    """The receiving end of a channel. Iterating yields messages until every sender closed."""

    def get(self, block: bool = True, timeout: float | None = None, copy: bool = False) -> Any:
        """Take the next message.

        Arrays and tensors in it are zero-copy views of shared memory, released when the last
        of them is gone; ``copy=True`` returns private copies and releases at once. Raises
        ``tensorslab.Empty`` on timeout (or at once with ``block=False``) and
        ``tensorslab.Closed`` once every sender has closed or exited and nothing is left.
        """

    def get_many(
        self,
        max_messages: int = 64,
        block: bool = True,
        timeout: float | None = None,
        copy: bool = False,
    ) -> list[Any]:
        """The next message, waiting as ``get`` does, and up to ``max_messages - 1`` more that
        are already queued, taken off the ring at once (faster-fifo's ``get_many``).

        A message that fails to decode is consumed with its error, as with ``get``; the ones
        before it in the batch are returned first, and the error is raised by the next call.
        """

    def get_nowait(self) -> Any:
        """``get(block=False)``."""

    def get_async(
        self, timeout: float | None = None, copy: bool = False
    ) -> Coroutine[Any, Any, Any]:
        """``await get_async()``: ``get`` without blocking the event loop.

        Raises what ``get`` raises (``Empty`` after ``timeout``, ``Closed``). A cancelled
        call leaves its message queued: the message is only taken by the loop's thread,
        once the call is sure to return it.
        """

    def __aiter__(self: _H) -> _H: ...
    def __anext__(self) -> Coroutine[Any, Any, Any]:
        """``async for msg in rx``: the next message; ends at ``Closed``, as iteration does."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...

@final
class Publisher(Handle):
    """The sending end of a broadcast channel: every subscriber receives every message."""

    def put(self, obj: Any, block: bool = True, timeout: float | None = None) -> None:
        """Send ``obj`` to every subscriber (one copy in shared memory).

        With ``overflow="block"`` waits while the slowest live subscriber is ``depth`` behind
        (``tensorslab.Full`` after ``timeout``); with ``"drop_oldest"`` never waits.
        ``tensorslab.Closed`` once every subscriber has closed or exited.
        """

    def put_nowait(self, obj: Any) -> None:
        """``put(obj, block=False)``."""

    def put_async(self, obj: Any, timeout: float | None = None) -> Coroutine[Any, Any, None]:
        """``await put_async(obj)``: ``put`` without blocking the event loop.

        Awaits room as ``put`` waits for it, and raises what it raises (``Full`` after
        ``timeout``, ``Closed``). The event loop's thread is never blocked and no thread is
        started per call (see the README, "asyncio"). Cancelling it publishes nothing.
        """

    def subscribe(self) -> Subscriber:
        """A new, independent subscriber that starts at the next message published."""

@final
class Subscriber(Handle):
    """One subscriber of a broadcast channel; its position is shared by all its handles."""

    def get(self, block: bool = True, timeout: float | None = None, copy: bool = False) -> Any:
        """The next message for this subscriber (NumPy arrays read-only unless ``copy``)."""

    def get_nowait(self) -> Any:
        """``get(block=False)``."""

    def get_async(
        self, timeout: float | None = None, copy: bool = False
    ) -> Coroutine[Any, Any, Any]:
        """``await get_async()``: ``get`` without blocking the event loop.

        Raises what ``get`` raises (``Empty`` after ``timeout``, ``Closed``). A cancelled
        call leaves its message queued: the message is only taken by the loop's thread,
        once the call is sure to return it.
        """

    def __aiter__(self: _H) -> _H: ...
    def __anext__(self) -> Coroutine[Any, Any, Any]:
        """``async for msg in rx``: the next message; ends at ``Closed``, as iteration does."""

    def subscribe(self) -> Subscriber:
        """A new, independent subscriber that starts at the next message published."""

    @property
    def missed(self) -> int:
        """Messages skipped because the publisher dropped them first (``drop_oldest``)."""

    def __iter__(self) -> Iterator[Any]: ...
    def __next__(self) -> Any: ...

@final
class Writer(Handle):
    """The writing end of a latest-value mailbox."""

    def publish(self, obj: Any, *, timeout: float | None = None) -> int:
        """Store ``obj`` as the newest version; returns its number (1, 2, ...)."""

    @property
    def version(self) -> int:
        """The newest version published (0 before the first)."""

@final
class Reader(Handle):
    """A reader of a latest-value mailbox."""

    @property
    def version(self) -> int:
        """The newest version published (0 before the first); no system call."""

    def get(
        self, newer_than: int | None = None, timeout: float | None = None, copy: bool = False
    ) -> tuple[int, Any]:
        """``(version, value)`` of the newest version, once one newer than ``newer_than`` exists."""

    def load_into(
        self, target: Any, newer_than: int | None = None, timeout: float | None = None
    ) -> int:
        """Copy the newest state dict into a module or dict of tensors; returns its version."""

    def get_async(
        self, newer_than: int | None = None, timeout: float | None = None, copy: bool = False
    ) -> Coroutine[Any, Any, tuple[int, Any]]:
        """``await get_async()``: ``get`` without blocking the event loop (``Empty`` after
        ``timeout``, ``Closed`` once every writer is gone and nothing newer is left)."""

    def __aiter__(self) -> AsyncIterator[tuple[int, Any]]:
        """``async for version, value in reader``: each version newer than the last one
        yielded (versions published in between are skipped); ends at ``Closed``."""

@final
class AioWaker:
    """Internal (``tensorslab._aio``): one event loop's eventfd, written by the helper."""

    def __new__(cls) -> AioWaker: ...
    def fileno(self) -> int: ...
    def take(self) -> list[int]: ...

@final
class AioWatch:
    """Internal (``tensorslab._aio``): one awaiting call's wait on a handle's side."""

    def __new__(cls, handle: Handle) -> AioWatch: ...
    @property
    def token(self) -> int: ...
    def snapshot(self) -> None: ...
    def arm(self, waker: AioWaker) -> bool: ...
    def disarm(self) -> None: ...

@final
class Lease:
    """The ``base`` of arrays that view slab memory; keeps it from being released."""

def broadcast(
    depth: int = 8,
    *,
    slab_bytes: int | None = None,
    max_slab_bytes: int | None = None,
    overflow: str = "block",
) -> tuple[Publisher, Subscriber]:
    """Create a broadcast channel: a publisher and its first subscriber."""

def latest(
    *, slab_bytes: int | None = None, max_slab_bytes: int | None = None
) -> tuple[Writer, Reader]:
    """Create a latest-value mailbox: a writer and a reader."""

def channel(
    capacity: int = 64,
    *,
    slab_bytes: int | None = None,
    max_slab_bytes: int | None = None,
    strict: bool = False,
    spin_us: float | None = None,
) -> tuple[Sender, Receiver]:
    """Create a channel and return its two ends.

    ``capacity``: messages queued and not yet taken. ``slab_bytes``: initial slab size
    (default: start at 4 MiB and grow). ``max_slab_bytes``: hard limit on shared memory
    (default: half the memory available). ``strict``: refuse values that need pickling.
    ``spin_us``: how long a blocked ``get`` or ``put`` spins before sleeping (default 20;
    up to 1,000,000), for every process using the channel: longer cuts the latency to a
    waiting consumer, at the cost of a busy core while it waits.
    """

def dumps(obj: Any) -> bytes:
    """Encode ``obj`` in the tensorslab format with its arrays inline."""

def loads(data: bytes | bytearray | memoryview, *, allow_pickle: bool = False) -> Any:
    """Decode bytes made by :func:`dumps`. Malformed data raises ``tensorslab.DecodeError``
    (naming the path inside the message); pickled parts are refused unless
    ``allow_pickle=True`` (unpickling can run code).

    Without ``allow_pickle``, no module is imported: classes the data names (dataclasses,
    named tuples, Enums, defaultdict factories) must be in modules already imported. A
    dataclass gets exactly its declared fields, a named tuple exactly its ``_fields``, an
    Enum member must exist, and a defaultdict factory must be a builtin or collections
    type, a dataclass or a named tuple class; anything else is refused."""

def _rebuild(state: bytes) -> Any: ...
def _rebuild_subscriber(state: bytes, index: int, generation: int) -> Subscriber: ...
def _drop_ticket(state: bytes) -> bool: ...
def _before_fork() -> None: ...
def _after_fork_in_parent() -> None: ...
def _after_fork_in_child(handed: list[Sender | Receiver] | None = None) -> None: ...
def _aio_after_fork_in_child() -> None: ...
def _aio_serve() -> None: ...
def _aio_try_latest(
    reader: Reader, newer_than: int, copy: bool
) -> tuple[int, Any] | None: ...


# ---- shared segments (tensorslab.share; see python/tensorslab/_share.py) ----

_SharedReference = tuple[list[tuple[int, int]], int, int, int]

@final
class SharedSegment:
    """One process's hold on a ``tensorslab.share`` segment: a memfd mapped once. Every
    view made from ``__dlpack__`` keeps it mapped; the last one to die unmaps it."""

    def __dlpack__(
        self,
        *,
        stream: Any = None,
        max_version: Any = None,
        dl_device: Any = None,
        copy: bool | None = None,
    ) -> Any:
        """The whole segment as a flat ``uint8`` DLPack tensor (never a copy)."""
    def __dlpack_device__(self) -> tuple[int, int]: ...
    def array(self) -> Any:
        """The whole segment as a flat, writable ``uint8`` NumPy array."""
    @property
    def nbytes(self) -> int:
        """Bytes mapped (a multiple of 64)."""
    @property
    def address(self) -> int:
        """Address of the mapping in this process."""
    def reference(self) -> _SharedReference:
        """``([(pid, fd), ...], nbytes, device, inode)``: what ``_share_attach`` takes."""

def _share_create(nbytes: int) -> SharedSegment: ...
def _share_attach(reference: _SharedReference) -> SharedSegment: ...
def _share_find(address: int, nbytes: int) -> tuple[SharedSegment, int] | None: ...
def _share_layout(sizes: list[int]) -> tuple[list[int], int]: ...
def _share_live() -> int: ...
