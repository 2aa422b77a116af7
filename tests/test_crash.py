"""Crash safety (issue 4): processes SIGKILLed at arbitrary points lose at most what they
held, leak nothing, and never leave their peers hanging."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import defaultdict

import numpy as np
import pytest

import crash_children
import tensorslab
from crash_children import is_intact, message
from helpers import Child


def kill(child: Child) -> None:
    os.kill(child.process.pid, signal.SIGKILL)
    child.process.join(30)
    assert not child.process.is_alive()


def drain(rx, *, timeout: float = 30) -> list:
    """Every message until Closed, as (producer, seq, intact), holding no views."""
    got = []
    while True:
        try:
            msg = rx.get(timeout=timeout)
        except tensorslab.Closed:
            return got
        got.append((msg["producer"], msg["seq"], is_intact(msg)))
        del msg


def wait_until(condition, *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_killed_consumer_holding_views_gives_its_memory_back(ctx_name):
    ctx = mp.get_context(ctx_name)
    tx, rx = tensorslab.channel(capacity=64, slab_bytes=8 << 20, max_slab_bytes=16 << 20)
    for seq in range(6):
        tx.put(message(0, seq, 1 << 20))
    ready = ctx.Event()
    holder = Child(ctx_name, crash_children.hold_then_wait, rx, 4, ready, timeout=120).start()
    try:
        assert ready.wait(60), "the consumer never took its messages"
        assert tx.stats()["slab_used_bytes"] >= 6 << 20
        kill(holder)
        # The memory the dead consumer held comes back (a blocked peer reaps it), the two
        # messages it did not take are still there, and the channel keeps working: 40 more
        # MiB pass through a 16 MiB slab only if nothing stays stuck.
        got = [(m["seq"], is_intact(m)) for m in [rx.get(timeout=30), rx.get(timeout=30)]]
        assert got == [(4, True), (5, True)]
        for seq in range(6, 46):
            tx.put(message(0, seq, 1 << 20), timeout=30)
            msg = rx.get(timeout=30)
            assert (msg["seq"], is_intact(msg)) == (seq, True)
            del msg
        wait_until(lambda: tx.stats()["slab_used_bytes"] == 0, what="the dead consumer's memory")
        assert tx.stats()["receivers"] == 1
    finally:
        holder.kill()


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_consumers_killed_at_random_moments_lose_at_most_what_they_held(ctx_name, tmp_path):
    ctx = mp.get_context(ctx_name)
    rng = random.Random(4)
    tx, rx = tensorslab.channel(capacity=16, max_slab_bytes=64 << 20)
    total, rounds = 800, 4
    delivered = []  # (seq, intact) seen by anyone: the victims' logs and this process
    for round_ in range(rounds):
        log = tmp_path / f"victim-{round_}.log"
        started = ctx.Event()
        victim = Child(ctx_name, crash_children.take_forever, rx, str(log), started, timeout=120)
        victim.start()
        try:
            assert started.wait(60)
            for seq in range(round_ * total // rounds, (round_ + 1) * total // rounds):
                tx.put(message(0, seq, 64 << 10), timeout=30)
                if seq % 50 == 0:
                    time.sleep(rng.uniform(0.0, 0.01))
        finally:
            kill(victim)
        if log.exists():
            for line in log.read_text().splitlines():
                seq, intact = line.split()
                delivered.append((int(seq), intact == "1"))
        # This process takes what the victim left queued.
        while True:
            try:
                msg = rx.get(timeout=0.2)
            except tensorslab.Empty:
                break
            delivered.append((msg["seq"], is_intact(msg)))
            del msg
    seqs = [seq for seq, _ in delivered]
    assert all(ok for _, ok in delivered), "a corrupt message was delivered"
    assert len(seqs) == len(set(seqs)), "a message was delivered twice"
    # A victim can lose the message it was holding and the one it took but had not logged.
    assert total - len(seqs) <= 2 * rounds, f"lost {total - len(seqs)} messages"
    wait_until(lambda: rx.stats()["slab_used_bytes"] == 0, what="memory of the killed consumers")
    assert rx.stats()["receivers"] == 1


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_producer_killed_mid_put_leaves_no_partial_message(ctx_name):
    ctx = mp.get_context(ctx_name)
    tx, rx = tensorslab.channel(capacity=4, max_slab_bytes=1 << 30)
    received = []
    for round_ in range(3):
        started = ctx.Event()
        # 64 MiB messages: copying one takes milliseconds, so a kill lands mid-put often.
        producer = Child(
            ctx_name, crash_children.put_forever, tx, round_, 64 << 20, started, timeout=120
        ).start()
        assert started.wait(60)
        time.sleep(0.05 + 0.1 * round_)
        kill(producer)
    tx.close()
    received = drain(rx)
    assert all(ok for _, _, ok in received), "a partial or corrupt message was delivered"
    by_producer = defaultdict(list)
    for producer, seq, _ in received:
        by_producer[producer].append(seq)
    for seqs in by_producer.values():
        assert seqs == list(range(len(seqs))), "a producer's messages out of order or with gaps"
    # The killed producers' unfinished allocations were reclaimed.
    wait_until(lambda: rx.stats()["slab_used_bytes"] == 0, what="the killed producers' allocations")


def test_nothing_survives_when_every_process_is_killed():
    ctx = mp.get_context("spawn")
    report = tempfile.NamedTemporaryFile(prefix="tsl-crash-", suffix=".txt", delete=False).name
    ready = ctx.Event()
    owner = Child("spawn", crash_children.create_and_hold, report, ready, timeout=120).start()
    try:
        assert ready.wait(60)
        with open(report) as file:
            channel_id = file.read().strip()
        assert len(channel_id) == 16
        name = f"tensorslab-{channel_id}"
        holders = lambda: [  # noqa: E731
            pid
            for pid in os.listdir("/proc")
            if pid.isdigit() and name in _read(f"/proc/{pid}/maps")
        ]
        assert holders() == [str(owner.process.pid)]
        kill(owner)
        assert holders() == [], "a process still maps the killed channel's memory"
        assert not [f for f in os.listdir("/dev/shm") if f.startswith("tensorslab-")]
    finally:
        owner.kill()
        os.unlink(report)


def _read(path: str) -> str:
    try:
        with open(path) as file:
            return file.read()
    except OSError:
        return ""


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
        subprocess.run(["umount", directory], check=False)
        os.rmdir(directory)


def test_a_full_small_shm_dir_is_an_error_not_sigbus(small_tmpfs, monkeypatch):
    monkeypatch.setenv("TENSORSLAB_SHM_DIR", small_tmpfs)
    tx, rx = tensorslab.channel(max_slab_bytes=1 << 30)
    with pytest.raises(tensorslab.ShmError) as raised:
        tx.put(np.ones(100 << 20, np.uint8))
    text = str(raised.value)
    assert small_tmpfs in text and "free" in text and "max_slab_bytes" in text, text
    # Nothing stays allocated and the channel still works for what fits.
    assert tx.stats()["slab_used_bytes"] == 0
    tx.put(np.arange(1000))
    assert np.array_equal(rx.get(timeout=10), np.arange(1000))
    assert os.listdir(small_tmpfs) == [], "segment files must be unlinked at once"
    del tx, rx
    gc.collect()


def test_fork_child_dropping_inherited_views_releases_nothing():
    """Issue 4, item 6: views inherited through fork never release the parent's memory,
    and the child can use the inherited endpoints."""
    tx, rx = tensorslab.channel()
    tx.put(np.arange(1 << 20))
    box = [rx.get(timeout=10)]
    held_bytes = rx.stats()["slab_used_bytes"]
    assert held_bytes > 0
    body = crash_children.drop_inherited_views_then_use_endpoints
    with Child("fork", body, box, tx, rx) as child:
        assert child.join() == 5 << 20
    # The child dropped its copy of the view and released its own message: the parent's
    # message is still held, and intact.
    assert rx.stats()["slab_used_bytes"] == held_bytes
    assert np.array_equal(box[0], np.arange(1 << 20))
    box.clear()
    gc.collect()
    assert rx.stats()["slab_used_bytes"] == 0


def test_children_killed_before_loading_their_handle_do_not_hold_the_channel():
    """A spawn child killed before it unpickles its sender leaves a ticket nobody will
    redeem; it must be withdrawn, or 128 such deaths would exhaust the pending table and
    the channel would never close. 150 are killed here."""
    ctx = mp.get_context("spawn")
    tx, rx = tensorslab.channel()
    for _ in range(150):
        process = ctx.Process(target=crash_children.put_three, args=(tx,))
        process.start()
        os.kill(process.pid, signal.SIGKILL)
        process.join(30)
    survivor = ctx.Process(target=crash_children.put_three, args=(tx,))
    survivor.start()
    tx.close()
    assert drain_values(rx) == [0, 1, 2]
    survivor.join(30)


def drain_values(rx) -> list:
    values = []
    while True:
        try:
            values.append(rx.get(timeout=60))
        except tensorslab.Closed:
            return values
