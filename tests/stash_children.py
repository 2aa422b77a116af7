"""Values and child functions for `test_batch_stash.py`: messages whose decoding runs Python code
(unpickled through a function here), so a test can make decoding fail or pause."""

from __future__ import annotations

import os
import threading

import tensorslab

# Set by `_paused` once a decode reached it; `_paused` then waits for `RESUME` (with the
# GIL released, as any Python wait does: another thread gets to run meanwhile).
DECODING = threading.Event()
RESUME = threading.Event()


def _paused(label: str) -> str:
    DECODING.set()
    RESUME.wait(30)
    return label


def _refused(label: str) -> str:
    raise ValueError(f"{label} cannot be rebuilt here")


class Paused:
    """Decodes to its label, after pausing (see `DECODING`)."""

    def __init__(self, label: str):
        self.label = label

    def __reduce__(self):
        return (_paused, (self.label,))


class Refused:
    """Fails to decode (`DecodeError` naming the label)."""

    def __init__(self, label: str):
        self.label = label

    def __reduce__(self):
        return (_refused, (self.label,))


def next_value(rx) -> str:
    """What the next `get` gives in this process: the value, or the exception's name."""
    try:
        return repr(rx.get(timeout=10))
    except tensorslab.TensorslabError as error:
        return type(error).__name__


def next_value_to_fd(rx, fd: int) -> None:
    """`next_value`, written to `fd` (for a child whose return value cannot be collected)."""
    os.write(fd, next_value(rx).encode())


def put_numbers(tx, count: int) -> int:
    """Puts 0..count in batches of 7."""
    for start in range(0, count, 7):
        tx.put_many(range(start, min(start + 7, count)))
    return count


def put_one(tx, value, timeout: float) -> str:
    """One `put` with a timeout; the outcome's name."""
    try:
        tx.put(value, timeout=timeout)
    except tensorslab.Full:
        return "Full"
    return "put"


def get_many_past_a_corrupt_tail() -> list:
    """A `get_many(sys.maxsize)` on a ring whose `tail` a corrupt peer moved 2**40 cells
    past the one real message: what it returns, then what the next call does."""
    import re
    import sys

    import corrupt_children

    tx, rx = tensorslab.channel(8)
    tx.put("real")
    channel_id = re.search(r"channel ([0-9a-f]+)", repr(tx)).group(1)
    shm = corrupt_children.Segments.of(channel_id)
    head = shm.u64("control", corrupt_children.RING_HEAD)
    shm.put_u64("control", corrupt_children.RING_TAIL, head + (1 << 40))
    first = rx.get_many(sys.maxsize, timeout=5)
    try:
        rx.get_many(sys.maxsize, timeout=0)
        after = "returned"
    except tensorslab.TensorslabError as error:
        after = type(error).__name__
    return [first, after]


def put_tagged(tx, producer: int, count: int) -> int:
    """Puts (producer, 0..count) in batches of 5."""
    for start in range(0, count, 5):
        tx.put_many([(producer, seq) for seq in range(start, min(start + 5, count))])
    tx.close()
    return count


def get_many_until_closed(rx) -> list:
    """Every message until every sender closed, taken with `get_many`."""
    got = []
    while True:
        try:
            got.extend(rx.get_many(16, timeout=30))
        except tensorslab.Closed:
            return got
