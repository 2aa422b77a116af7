"""Bodies of the stress test's producers and consumers (importable for spawn)."""

from __future__ import annotations

import random
import zlib

import numpy as np

import tensorslab

MIN_BYTES, MAX_BYTES = 64, 8 << 20


def sizes(producer: int, count: int) -> list[int]:
    """Log-uniform sizes between 64 B and 8 MiB (most messages small, some large)."""
    rng = random.Random(producer)
    low, high = np.log2(MIN_BYTES), np.log2(MAX_BYTES)
    return [int(2 ** rng.uniform(low, high)) for _ in range(count)]


def produce(tx, producer: int, count: int) -> int:
    rng = np.random.default_rng(producer)
    block = rng.integers(0, 256, MAX_BYTES, dtype=np.uint8)
    for seq, nbytes in enumerate(sizes(producer, count)):
        start = (seq * 4099) % (MAX_BYTES - nbytes + 1)
        payload = block[start : start + nbytes]
        tx.put({"id": (producer, seq), "crc": zlib.crc32(payload), "payload": payload}, timeout=120)
    tx.close()
    return count


def consume(rx) -> tuple[list, int]:
    """Every (producer, seq) in arrival order, and how many failed their checksum."""
    got, corrupt = [], 0
    while True:
        try:
            msg = rx.get(timeout=120)
        except tensorslab.Closed:
            break
        got.append(tuple(msg["id"]))
        corrupt += zlib.crc32(msg["payload"]) != msg["crc"]
        del msg
    rx.close()
    return got, corrupt
