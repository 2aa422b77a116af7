"""Producers asleep on a full ring are woken once a quarter of it is free (not at every
pop, see `Channel::after_pops`); one left asleep below that mark still gets its room at its
next bounded sleep, within its timeout."""

from __future__ import annotations

import re
import time

import corrupt_children
import stash_children
import tensorslab
from helpers import Child

# `RingState::producers_waiting`: after head, tail (u64), pushed, popped, consumers_waiting.
PRODUCERS_WAITING = corrupt_children.RING_TAIL + 8 + 12


def wait_for(predicate, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_a_producer_asleep_on_a_full_ring_gets_one_freed_cell():
    tx, rx = tensorslab.channel(64)
    tx.put_many(range(64))
    channel_id = re.search(r"channel ([0-9a-f]+)", repr(tx)).group(1)
    shm = corrupt_children.Segments.of(channel_id)
    with Child("fork", stash_children.put_one, tx, 64, 30) as child:
        wait_for(lambda: shm.u32("control", PRODUCERS_WAITING) == 1, "the producer to sleep")
        # One cell free, far below the quarter mark: no wake-up is sent for it.
        assert rx.get(timeout=5) == 0
        assert child.join() == "put"
    assert rx.get_many(64, timeout=5) == list(range(1, 65))
    tx.close()
    rx.close()
