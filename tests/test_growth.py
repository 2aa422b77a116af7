"""Slab growth: a new segment's pages are reserved and faulted in by a few threads
(`src/shm/populate.rs`); what they prepare must hold the right bytes in every process, and
a growth that fails must leave nothing behind."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import growth_children
import tensorslab
from helpers import Child

# More than one populating thread's share (64 MiB), where the machine has the cores.
COUNT = (200 << 20) // 8 + 3


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_a_large_first_message_arrives_intact_in_another_process(ctx_name):
    tx, rx = tensorslab.channel(capacity=2)
    with Child(ctx_name, growth_children.check_arange, rx, COUNT, timeout=120) as child:
        rx.close()
        tx.put(np.arange(COUNT, dtype=np.int64), timeout=60)
        segments = child.join()
    # One message lies in one block, so in one segment: the first one and its own.
    assert segments <= 2, segments
    tx.close()
    gc.collect()


def test_a_growth_that_cannot_be_mapped_leaves_nothing_and_the_channel_usable():
    with Child("spawn", growth_children.growth_that_cannot_be_mapped, timeout=120) as child:
        message = child.join()
    assert "1.0 GiB" in message and "max_slab_bytes" in message, message
