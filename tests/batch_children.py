"""Functions the batch-call and spin tests (`test_batch.py`) run in child processes."""

from __future__ import annotations

import numpy as np

import tensorslab
from child_runner import run_and_report  # noqa: F401  (re-exported: the entry point)

TIMEOUT = 60


class Explodes:
    """Encodes (pickles) fine; unpickling it in the receiver raises."""

    def __reduce__(self):
        return (_explode, ("this message cannot be rebuilt",))


def _explode(text):
    raise ValueError(text)


def put_many_batches(tx, producer, count, batch):
    """Puts (producer, seq, array) messages with put_many, `batch` at a time."""
    for start in range(0, count, batch):
        tx.put_many(
            [
                (producer, seq, np.full(16, seq % 251, np.uint8))
                for seq in range(start, min(count, start + batch))
            ],
            timeout=TIMEOUT,
        )
    tx.close()
    return count


def get_many_until_closed(rx, max_messages):
    """Every (producer, seq) received with get_many until the senders are gone, and the
    largest batch seen; checks each array's content against its seq."""
    got, largest = [], 0
    while True:
        try:
            batch = rx.get_many(max_messages, timeout=TIMEOUT)
        except tensorslab.Closed:
            break
        assert 1 <= len(batch) <= max_messages, len(batch)
        largest = max(largest, len(batch))
        for producer, seq, array in batch:
            assert (array == seq % 251).all(), (producer, seq)
            got.append((producer, seq))
    rx.close()
    return got, largest


def put_blocked_until_room(tx, timeout):
    """One put into a full ring; returns once it went through."""
    tx.put("after the ring was full", timeout=timeout)
    tx.close()
    return True


def channel_spin(rx):
    """The spin this process read from the channel it attached."""
    spin = rx.stats()["spin_us"]
    rx.close()
    return spin
