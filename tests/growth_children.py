"""Functions that tests/test_growth.py runs in child processes (see `helpers.Child`)."""

from __future__ import annotations

import os
import resource

import numpy as np

import tensorslab


def check_arange(rx, count: int) -> int:
    """Take one int64 array and check it is ``np.arange(count)``, every element; return how
    many slab segments the channel maps."""
    got = rx.get(timeout=60)
    assert got.shape == (count,), got.shape
    assert np.array_equal(got, np.arange(count, dtype=np.int64)), "bytes differ"
    segments = rx.stats()["segments"]
    del got
    return segments


def _segment_descriptors() -> list[str]:
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if "tensorslab-" in target:
            found.append(target)
    return found


def growth_that_cannot_be_mapped() -> str:
    """With the address space limited, a growth by 1 GiB cannot map its segment: the put
    must fail with a clean error, keep nothing (no block, no descriptor of the half-made
    segment) and leave the channel usable."""
    tx, rx = tensorslab.channel()
    big = np.zeros(1 << 30, np.uint8)  # calloc: no page of it is touched
    before = _segment_descriptors()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as file:
        mapped_now = int(file.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (mapped_now + (256 << 20), hard))
    try:
        try:
            tx.put(big, timeout=30)
        except tensorslab.ShmError as error:
            message = str(error)
        else:
            raise AssertionError("a 1 GiB segment was mapped past the address-space limit")
        assert tx.stats()["slab_used_bytes"] == 0, tx.stats()
        assert _segment_descriptors() == before, (before, _segment_descriptors())
        tx.put(np.arange(1000), timeout=30)
        assert np.array_equal(rx.get(timeout=30), np.arange(1000))
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    tx.close()
    rx.close()
    return message
