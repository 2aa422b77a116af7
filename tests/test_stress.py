"""Many producers and consumers, more processes than cores (issue 4, item 1): 4 producers
and 4 consumers move 50,000 messages of 64 B to 8 MiB. Every message arrives exactly once
and intact, each producer's messages in order at each consumer, and the slab is entirely
free at the end."""

from __future__ import annotations

from collections import defaultdict

import pytest

import stress_children
import tensorslab
from helpers import Child

PRODUCERS, CONSUMERS, MESSAGES = 4, 4, 50_000


@pytest.mark.timeout(900)
@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_four_producers_four_consumers_fifty_thousand_messages(ctx_name):
    per_producer = MESSAGES // PRODUCERS
    tx, rx = tensorslab.channel(capacity=64, max_slab_bytes=512 << 20)
    producers = [
        Child(ctx_name, stress_children.produce, tx, p, per_producer, timeout=800)
        for p in range(PRODUCERS)
    ]
    consumers = [
        Child(ctx_name, stress_children.consume, rx, timeout=800) for _ in range(CONSUMERS)
    ]
    for child in producers + consumers:
        child.start()
    tx.close()
    rx.close()
    try:
        assert [p.join() for p in producers] == [per_producer] * PRODUCERS
        results = [c.join() for c in consumers]
    finally:
        for child in producers + consumers:
            child.kill()
    everything = []
    for got, corrupt in results:
        assert corrupt == 0, f"{corrupt} messages failed their checksum"
        by_producer = defaultdict(list)
        for producer, seq in got:
            by_producer[producer].append(seq)
        for producer, seqs in by_producer.items():
            assert seqs == sorted(seqs), f"producer {producer}'s messages out of order"
        everything += got
    assert len(everything) == MESSAGES, f"{MESSAGES - len(everything)} messages lost"
    assert len(set(everything)) == MESSAGES, "a message was delivered twice"
    # Every byte of the slab is free again (stats still read a closed handle's channel).
    assert rx.stats()["slab_used_bytes"] == 0
    assert rx.stats()["messages_in_flight"] == 0
