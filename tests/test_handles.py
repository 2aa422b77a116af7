"""Handles: which keep a channel open, how they travel to other processes, and what
closing (or dying) does to the other side."""

from __future__ import annotations

import gc
import multiprocessing as mp
import pickle
from collections import defaultdict

import numpy as np
import pytest

import children
import tensorslab
from helpers import START_METHODS, Child, get_until_closed, run_in_child


@pytest.mark.parametrize("ctx_name", START_METHODS)
def test_closing_parent_sender_after_start_keeps_channel_open(ctx_name):
    """The README pattern: the child's handle counts before the child has attached."""
    tx, rx = tensorslab.channel(capacity=8)
    with Child(ctx_name, children.produce, tx, 0, 100) as child:
        tx.close()
        received = get_until_closed(rx)
        assert child.join() == 100
    assert [m["seq"] for m in received] == list(range(100))
    rx.close()


@pytest.mark.parametrize("exit_without_close", [False, True])
def test_closing_parent_sender_after_fork_start_repeatedly(exit_without_close):
    """The same pattern, repeated: a race between the parent's close and the fork child's
    registration shows up as an early Closed with messages still to come."""
    target = children.produce_then_exit if exit_without_close else children.produce
    for attempt in range(25):
        tx, rx = tensorslab.channel()
        args = (tx, 5) if exit_without_close else (tx, 0, 5)
        with Child("fork", target, *args):
            tx.close()
            received = get_until_closed(rx)
        assert [m["seq"] for m in received] == list(range(5)), f"attempt {attempt}"
        del received
        rx.close()


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_many_producers_many_consumers(ctx_name):
    """3 producers, 2 consumers: each message delivered exactly once, per-producer order
    kept at each consumer, payloads intact."""
    producers, per_producer = 3, 300
    tx, rx = tensorslab.channel(capacity=16)
    processes = [
        Child(ctx_name, children.produce_with_payload, tx, p, per_producer, p, timeout=240)
        for p in range(producers)
    ] + [Child(ctx_name, children.consume, rx, timeout=240) for _ in range(2)]
    for process in processes:
        process.start()
    tx.close()
    rx.close()
    try:
        results = [process.join() for process in processes]
    finally:
        for process in processes:
            process.kill()
    assert results[:producers] == [per_producer] * producers
    everything = []
    for got, corrupt in results[producers:]:
        assert not corrupt, f"corrupt payloads: {corrupt}"
        by_producer = defaultdict(list)
        for producer, seq in got:
            by_producer[producer].append(seq)
        for producer, seqs in by_producer.items():
            assert seqs == sorted(seqs), f"producer {producer} out of order at a consumer"
        everything += got
    expected = [(p, s) for p in range(producers) for s in range(per_producer)]
    assert sorted(everything) == expected, "lost or duplicated messages"


@pytest.mark.parametrize("side", ["sender", "receiver"])
def test_handle_through_mp_queue(side):
    # mp.Queue pickles in a feeder thread, after put() returns: the parent closes its own
    # copy only once the child is known to hold the handle.
    ctx = mp.get_context("spawn")
    handoff = ctx.Queue()
    tx, rx = tensorslab.channel()
    if side == "sender":
        with Child("spawn", children.produce_from_queue, handoff, 20) as child:
            handoff.put(tx)
            received = [rx.get(timeout=60)]
            tx.close()
            received += get_until_closed(rx)
            assert child.join() == 20
        assert [m["seq"] for m in received] == list(range(20))
        rx.close()
    else:
        with Child("spawn", children.consume_from_queue, handoff) as child:
            handoff.put(rx)
            children.produce(tx, 0, 20)
            got, corrupt = child.join()
        rx.close()
        assert got == [(0, seq) for seq in range(20)] and not corrupt
    handoff.close()
    handoff.join_thread()


def test_pickled_handle_in_the_same_process():
    tx, rx = tensorslab.channel()
    tx2 = pickle.loads(pickle.dumps(tx))
    rx2 = pickle.loads(pickle.dumps(rx))
    tx.close()
    tx2.put("via the copy", timeout=10)
    assert rx2.get(timeout=10) == "via the copy"
    rx2.close()
    tx2.put("still one receiver", timeout=10)
    assert rx.get(timeout=10) == "still one receiver"
    tx2.close()
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    rx.close()


def test_iteration_ends_when_every_sender_closes():
    tx, rx = tensorslab.channel()
    tx_second = pickle.loads(pickle.dumps(tx))
    for i in range(3):
        tx.put(i, timeout=10)
    tx.close()
    tx_second.put(3, timeout=10)
    tx_second.close()
    assert list(rx) == [0, 1, 2, 3]
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    with pytest.raises(tensorslab.Closed):
        rx.get_nowait()
    rx.close()


def test_closed_is_raised_only_after_the_queue_drains():
    tx, rx = tensorslab.channel()
    tx.put({"a": np.ones(3)}, timeout=10)
    tx.close()
    assert np.array_equal(rx.get(timeout=10)["a"], np.ones(3))
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    rx.close()


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_sender_process_exits_without_closing(ctx_name):
    tx, rx = tensorslab.channel()
    with Child(ctx_name, children.produce_then_exit, tx, 5):
        tx.close()
        received = []
        with pytest.raises(tensorslab.Closed):  # PeerGone is a Closed
            for _ in range(6):
                received.append(rx.get(timeout=60))
    assert [m["seq"] for m in received] == list(range(5))
    rx.close()


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_sender_process_killed(ctx_name):
    tx, rx = tensorslab.channel()
    child = Child(ctx_name, children.produce_then_hang, tx, 5).start()
    try:
        tx.close()
        received = [rx.get(timeout=60) for _ in range(5)]
        child.kill()
        child.join(expect_exitcode=None)
        with pytest.raises(tensorslab.Closed):
            rx.get(timeout=60)
    finally:
        child.kill()
    assert [m["seq"] for m in received] == list(range(5))
    rx.close()


def test_put_raises_closed_when_every_receiver_closed():
    tx, rx = tensorslab.channel()
    tx.put(1, timeout=10)
    rx.close()
    with pytest.raises(tensorslab.Closed):
        tx.put(2, timeout=10)
    with pytest.raises(tensorslab.Closed):
        tx.put_nowait(3)
    tx.close()


@pytest.mark.parametrize("ctx_name", ["fork", "spawn"])
def test_put_raises_closed_when_receiver_process_leaves(ctx_name):
    tx, rx = tensorslab.channel(capacity=4)
    with Child(ctx_name, children.receive_some_then_close, rx, 3) as child:
        rx.close()
        with pytest.raises(tensorslab.Closed):
            for seq in range(10_000):
                tx.put({"seq": seq}, timeout=60)
        assert child.join() == [0, 1, 2]
    tx.close()


def test_use_after_close_raises_value_error():
    tx, rx = tensorslab.channel()
    tx.close()
    rx.close()
    tx.close()  # closing twice is allowed, as with mp.Queue
    rx.close()
    for call in (
        lambda: tx.put(1, timeout=1),
        lambda: tx.put_nowait(1),
        lambda: tx.alloc((2,), np.dtype("float32")),
        lambda: rx.get(timeout=1),
        lambda: rx.get_nowait(),
    ):
        with pytest.raises(ValueError):
            call()


def test_context_managers_close():
    with tensorslab.channel()[0] as tx:
        pass
    with pytest.raises(ValueError):
        tx.put(1, timeout=1)
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put("inside", timeout=10)
        assert rx.get(timeout=10) == "inside"
    with pytest.raises(ValueError):
        rx.get(timeout=1)


def test_garbage_collected_handles_close_the_channel():
    tx, rx = tensorslab.channel()
    tx.put(1, timeout=10)
    del tx
    gc.collect()
    assert rx.get(timeout=10) == 1
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    rx.close()


def test_forkserver_child_can_receive():
    tx, rx = tensorslab.channel()
    for seq in range(10):
        tx.put({"producer": 0, "seq": seq}, timeout=10)
    tx.close()
    got, corrupt = run_in_child("forkserver", children.consume, rx)
    assert got == [(0, seq) for seq in range(10)] and not corrupt
    rx.close()
