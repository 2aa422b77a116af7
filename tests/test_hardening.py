"""Regression tests for the hardening issue: the reproduced failures, across fork and spawn.

- messages built in `Sender.alloc` buffers survive their producer's exit;
- a process that cannot look (out of file descriptors) never takes a live peer for dead.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import time

import pytest

import tensorslab
from hardening_children import (
    ALLOC_BYTES,
    alloc_fill,
    alloc_put_then_exit,
    put_then_die,
    starve_descriptors_then_receive,
    take_then_close,
    wait_to_be_killed,
)
from helpers import Child

EXITS = ("return", "close", "os._exit")


def wait_until_detached(handle, pid: int, timeout: float = 30) -> None:
    """Waits until `pid` no longer counts as attached (it detached, or a peer reaped it)."""
    deadline = time.monotonic() + timeout
    while pid in handle.stats()["processes"]:
        assert time.monotonic() < deadline, f"process {pid} still attached after {timeout} s"
        time.sleep(0.02)


@pytest.mark.parametrize("how", EXITS)
@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_alloc_messages_survive_their_producer_exiting(ctx_name, how):
    tx, rx = tensorslab.channel(capacity=64)
    per_producer = 3
    # The first producer exits before anything is received; the second then allocates,
    # which is where the first one's blocks used to be handed out again.
    for tag in (1, 2):
        with Child(ctx_name, alloc_put_then_exit, tx, tag, per_producer, how, timeout=90) as child:
            pass
        wait_until_detached(tx, child.pid)
    tx.close()
    seen = set()
    for _ in range(2 * per_producer):
        message = rx.get(timeout=30)
        tag, index = message["tag"], message["index"]
        data = message["data"]
        assert data.shape == (ALLOC_BYTES,)
        wrong = int((data != alloc_fill(tag, index)).sum())
        assert wrong == 0, f"producer {tag} message {index}: {wrong} of {ALLOC_BYTES} bytes wrong"
        seen.add((tag, index))
        del message, data
    assert seen == {(tag, index) for tag in (1, 2) for index in range(per_producer)}
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    stats = rx.stats()
    assert stats["slab_used_bytes"] == 0, stats
    assert stats["messages_in_flight"] == 0, stats


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_a_consumer_out_of_descriptors_does_not_take_its_producer_for_dead(ctx_name):
    tx, rx = tensorslab.channel(capacity=4)
    count = 40
    with Child(ctx_name, starve_descriptors_then_receive, rx, count, 0.6, timeout=90) as child:
        rx.close()
        for seq in range(count):
            # Fails with Closed if the consumer's reaper took this process for dead.
            tx.put({"seq": seq}, timeout=30)
        assert child.join() == count
    tx.close()


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_producers_that_died_are_reported_as_peer_gone_after_their_messages(ctx_name):
    tx, rx = tensorslab.channel(capacity=8)
    with Child(ctx_name, put_then_die, tx, 3, timeout=60):
        pass
    tx.close()
    assert [rx.get(timeout=30)["seq"] for _ in range(3)] == [0, 1, 2]
    with pytest.raises(tensorslab.PeerGone, match=r"died without closing \(pid \d+\)"):
        rx.get(timeout=30)


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_receivers_that_closed_are_reported_as_closed_not_peer_gone(ctx_name):
    tx, rx = tensorslab.channel(capacity=8)
    tx.put({"seq": 5})
    with Child(ctx_name, take_then_close, rx, timeout=60) as child:
        rx.close()
    assert child.join() == 5
    with pytest.raises(tensorslab.Closed) as raised:
        tx.put({"seq": 6}, timeout=30)
    assert not isinstance(raised.value, tensorslab.PeerGone), raised.value


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_a_killed_receiver_is_reported_to_the_producer_as_peer_gone(ctx_name):
    tx, rx = tensorslab.channel(capacity=8)
    started = mp.get_context(ctx_name).Event()
    child = Child(ctx_name, wait_to_be_killed, rx, started, timeout=60).start()
    try:
        assert started.wait(30), "the receiver never started"
        rx.close()
        child.process.kill()
        child.join(expect_exitcode=-signal.SIGKILL)
    finally:
        child.kill()
    wait_until_detached(tx, child.pid)
    with pytest.raises(tensorslab.PeerGone, match="receiver"):
        tx.put({"seq": 1}, timeout=30)
