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
