"""asyncio for every handle: the loop side of ``put_async``, ``get_async`` and ``async for``.

How a wait goes (``_until``): take a snapshot of the words the handle's side becomes ready
on, try the non-blocking call (``get(block=False)``, ``put(block=False)``); if it would
block, register the wait (``AioWatch.arm``) and await a future. One helper thread per
process (``tensorslab-aio``, a daemon started on first use, a new one in a fork child)
sleeps in ``futex_waitv`` on the words of every wait of every loop and, when one moves,
writes to that loop's eventfd, which the loop watches with ``add_reader``; the reader
callback resolves the futures and the waits try again. The loop never blocks and never
polls; no thread is started per call (see ``src/py/aio.rs`` and
``src/channel/readiness.rs``).

The message is only ever taken, and a message only ever published, by the non-blocking
call in the loop's thread: a wait that is cancelled (a timeout, ``task.cancel()``,
Ctrl-C under ``asyncio.run``) leaves the channel as it was, its message still queued.
"""

from __future__ import annotations

import asyncio
import math
import os
import threading
import weakref
from typing import Any, AsyncIterator, Callable, TypeVar

from . import _tensorslab
from .exceptions import Closed, Empty, Full, PeerGone

_T = TypeVar("_T")

_helper_lock = threading.Lock()
_helper: threading.Thread | None = None
_helper_pid = 0


def _ensure_helper() -> None:
    """Starts this process's helper thread unless it runs already."""
    global _helper, _helper_pid
    if _helper_pid == os.getpid() and _helper is not None and _helper.is_alive():
        return
    with _helper_lock:
        if _helper_pid == os.getpid() and _helper is not None and _helper.is_alive():
            return
        thread = threading.Thread(target=_tensorslab._aio_serve, name="tensorslab-aio", daemon=True)
        thread.start()
        _helper, _helper_pid = thread, os.getpid()


def _after_fork_in_child() -> None:
    # The parent's helper does not exist here; its lock may have been held at the fork.
    global _helper_lock, _helper
    _helper_lock, _helper = threading.Lock(), None
    _tensorslab._aio_after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)


class _LoopWaker:
    """One event loop's eventfd, watched by the loop, and the futures of its waits."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = os.getpid()
        self.waker = _tensorslab.AioWaker()
        # Weak: a future holds its loop, and `_wakers` holds this object as long as the
        # loop lives; a strong future of a task left pending in a closed loop would keep
        # the loop, its eventfd and the armed wait alive for ever. The awaiting frame holds
        # its future while it waits.
        self.futures: weakref.WeakValueDictionary[int, asyncio.Future[None]] = (
            weakref.WeakValueDictionary()
        )
        loop.add_reader(self.waker.fileno(), self._ready)

    def _ready(self) -> None:
        for token in self.waker.take():
            future = self.futures.get(token)
            if future is not None and not future.done():
                future.set_result(None)


_wakers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopWaker] = (
    weakref.WeakKeyDictionary()
)


def _waker_for(loop: asyncio.AbstractEventLoop) -> _LoopWaker:
    waker = _wakers.get(loop)
    if waker is None or waker.pid != os.getpid():
        waker = _wakers[loop] = _LoopWaker(loop)
    return waker


def _checked(timeout: float | None) -> float | None:
    # As the blocking calls take it (`py::blocking::deadline`).
    if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
        raise ValueError(f"timeout must be a non-negative number, got {timeout}")
    return timeout


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _until(
    handle: Any,
    attempt: Callable[[], _T],
    would_block: type[Exception],
    timeout: float | None,
    expired: Callable[[Exception], Exception],
) -> _T:
    """Runs ``attempt`` (non-blocking) until it does not raise ``would_block``, awaiting
    the helper's word that ``handle``'s side may be ready between tries; after
    ``timeout`` seconds raises ``expired(last would_block error)``."""
    timeout = _checked(timeout)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    watch = _tensorslab.AioWatch(handle)  # the snapshot comes before the attempt
    while True:
        try:
            return attempt()
        except would_block as error:
            if deadline is not None and loop.time() >= deadline:
                raise expired(error) from None
        waker = _waker_for(loop)
        _ensure_helper()
        if watch.arm(waker.waker):
            future = loop.create_future()
            waker.futures[watch.token] = future
            timer = None if deadline is None else loop.call_at(deadline, _wake, future)
            try:
                await future
            finally:
                watch.disarm()
                # Gone already when the garbage collector finalizes an abandoned task.
                waker.futures.pop(watch.token, None)
                if timer is not None:
                    timer.cancel()
        else:
            # The side moved since the snapshot: try again, after letting the loop run (a
            # channel whose words keep moving must not keep this loop to itself).
            await asyncio.sleep(0)
        watch.snapshot()


def _get_expired(error: Exception) -> Exception:
    return Empty("no message arrived before the timeout")


def _put_expired(error: Exception) -> Exception:
    return error


async def get(handle: Any, timeout: float | None, copy: bool) -> Any:
    """``Receiver.get_async`` and ``Subscriber.get_async``."""
    return await _until(
        handle, lambda: handle.get(False, None, copy), Empty, timeout, _get_expired
    )


async def put(handle: Any, obj: Any, timeout: float | None) -> None:
    """``Sender.put_async`` and ``Publisher.put_async``."""
    await _until(handle, lambda: handle.put(obj, False), Full, timeout, _put_expired)


async def next_message(handle: Any) -> Any:
    """``__anext__`` of a receiver or subscriber: ends at ``Closed``, as iteration does."""
    try:
        return await get(handle, None, False)
    except PeerGone:
        raise
    except Closed:
        raise StopAsyncIteration from None


class _NotYet(Exception):
    """No version newer than asked for exists yet (internal)."""


async def get_latest(
    reader: Any, newer_than: int | None, timeout: float | None, copy: bool
) -> tuple[int, Any]:
    """``Reader.get_async``."""
    newer = 0 if newer_than is None else newer_than

    def attempt() -> tuple[int, Any]:
        got = _tensorslab._aio_try_latest(reader, newer, copy)
        if got is None:
            raise _NotYet
        return got

    def expired(error: Exception) -> Exception:
        return Empty(f"no version newer than {newer} was published before the timeout")

    return await _until(reader, attempt, _NotYet, timeout, expired)


async def versions(reader: Any) -> AsyncIterator[tuple[int, Any]]:
    """``async for version, value in reader``: every version newer than the last one
    yielded (versions published in between are skipped, as ``get`` skips them); ends at
    ``Closed``."""
    newer = 0
    while True:
        try:
            version, value = await get_latest(reader, newer, None, False)
        except PeerGone:
            raise
        except Closed:
            return
        newer = version
        yield version, value
