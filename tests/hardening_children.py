"""Child-process bodies for tests/test_hardening.py (see `helpers.Child`)."""

from __future__ import annotations

import os
import resource
import time

import numpy as np

ALLOC_BYTES = 2 << 20


def alloc_fill(tag: int, index: int) -> int:
    return (tag * 10 + index) % 251


def alloc_put_then_exit(tx, tag: int, count: int, how: str) -> int:
    """Put `count` messages built in `alloc` buffers, drop every view, then exit `how`:
    by returning, after `close()`, or with `os._exit` (no interpreter clean-up at all)."""
    for index in range(count):
        buffer = tx.alloc((ALLOC_BYTES,), np.uint8)
        buffer[:] = alloc_fill(tag, index)
        tx.put({"tag": tag, "index": index, "data": buffer}, timeout=30)
        del buffer
    if how == "close":
        tx.close()
    elif how == "os._exit":
        os._exit(0)
    return count


def starve_descriptors_then_receive(rx, count: int, starve_seconds: float) -> int:
    """Take one message, then hold every free file descriptor of this process for
    `starve_seconds` (as a process at RLIMIT_NOFILE does), then take `count - 1` more."""
    first = rx.get(timeout=30)
    del first
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        while len(held) < soft:
            held.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    time.sleep(starve_seconds)
    for fd in held:
        os.close(fd)
    for _ in range(count - 1):
        message = rx.get(timeout=30)
        del message
    return count


def put_then_die(tx, count: int) -> None:
    """Put `count` messages, then die without closing anything (as SIGKILL would)."""
    for seq in range(count):
        tx.put({"seq": seq}, timeout=30)
    os._exit(0)


def take_then_close(rx) -> int:
    message = rx.get(timeout=30)
    rx.close()
    return message["seq"]


def wait_to_be_killed(handle, started) -> None:
    """Hold `handle` open, say so, and sleep until killed."""
    started.set()
    time.sleep(600)
    del handle
