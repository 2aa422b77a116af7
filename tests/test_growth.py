"""Slab growth: a new segment's pages are reserved and faulted in by a few threads
(`src/shm/populate.rs`); what they prepare must hold the right bytes in every process, and
a growth that fails must leave nothing behind."""

from __future__ import annotations

import gc
import os
import re
import shutil
import subprocess
import tempfile

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


@pytest.fixture
def small_tmpfs():
    """A 64 MiB tmpfs (a container's /dev/shm); needs root to mount."""
    directory = tempfile.mkdtemp(prefix="tsl-small-shm-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", directory],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        # Lazily: a failed test's traceback may still hold a channel mapping it.
        subprocess.run(["umount", "--lazy", directory], check=False)
        os.rmdir(directory)


def test_a_growth_that_fills_the_shm_dir_reports_the_space_free_before_it(small_tmpfs, monkeypatch):
    """The populating threads fail part-way through; what they had reserved is given back
    before the error says how much is free (it said 0 B, the pages of the failed segment)."""
    monkeypatch.setenv("TENSORSLAB_SHM_DIR", small_tmpfs)
    tx, rx = tensorslab.channel(max_slab_bytes=1 << 30)
    with pytest.raises(tensorslab.ShmError) as raised:
        tx.put(np.ones(100 << 20, np.uint8))
    # 64 MiB less the channel's control segment (under a MiB).
    free = re.search(r"\((\d+\.\d) MiB free\)", str(raised.value))
    assert free and float(free.group(1)) > 63, raised.value
    assert shutil.disk_usage(small_tmpfs).used < 1 << 20
    tx.put(np.arange(1000))
    assert np.array_equal(rx.get(timeout=10), np.arange(1000))
    del tx, rx
    gc.collect()
