"""`tensorslab.Queue` is a drop-in for `multiprocessing.Queue`: each test runs the same code
against both, so a difference in behaviour shows up as one of the pair failing."""

from __future__ import annotations

import multiprocessing as mp
import queue

import numpy as np
import pytest
import torch

import children
import tensorslab
from helpers import Child


def multiprocessing_queue(maxsize=0):
    return mp.get_context("spawn").Queue(maxsize)


QUEUES = {"multiprocessing": multiprocessing_queue, "tensorslab": tensorslab.Queue}


def finish(*queues) -> None:
    for q in queues:
        q.close()
        q.join_thread()


@pytest.mark.parametrize("kind", list(QUEUES))
def test_producer_consumer_with_spawn_child(kind):
    inbox, outbox = QUEUES[kind](), QUEUES[kind]()
    items = [3, 2.5, np.arange(5.0), torch.ones(2, 3), "ab"]
    with Child("spawn", children.queue_worker, inbox, outbox) as child:
        for index, item in enumerate(items):
            inbox.put((index, item))
        inbox.put(None)
        results = [outbox.get(timeout=60) for _ in range(len(items) + 1)]
        inbox.put("done")
        assert child.join() == len(items)
    assert results[-1] is None
    assert [index for index, _ in results[:-1]] == list(range(len(items)))
    assert results[0][1] == 6 and results[1][1] == 5.0 and results[4][1] == "abab"
    assert np.array_equal(results[2][1], np.arange(5.0) * 2)
    assert torch.equal(results[3][1], torch.ones(2, 3) * 2)
    finish(inbox, outbox)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_bounded_queue(kind):
    q = QUEUES[kind](maxsize=2)
    assert q.empty() and not q.full() and q.qsize() == 0
    q.put("a")
    q.put_nowait({"b": np.arange(3)})
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put_nowait("c")
    with pytest.raises(queue.Full):
        q.put("c", timeout=0.05)
    with pytest.raises(queue.Full):
        q.put("c", block=False)
    assert q.get(timeout=10) == "a"
    assert np.array_equal(q.get(timeout=10)["b"], np.arange(3))
    assert q.qsize() == 0 and q.empty() and not q.full()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(block=False)
    finish(q)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_unbounded_queue_fifo(kind):
    q = QUEUES[kind]()
    for i in range(1000):
        q.put_nowait({"i": i})
    assert [q.get(timeout=10)["i"] for _ in range(1000)] == list(range(1000))
    finish(q)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_put_after_close_raises_value_error(kind):
    q = QUEUES[kind]()
    q.put(1)
    assert q.get(timeout=10) == 1
    q.close()
    with pytest.raises(ValueError):
        q.put(2)
    q.join_thread()


@pytest.mark.parametrize("kind", list(QUEUES))
def test_get_and_put_after_close_raise_value_error_naming_the_queue(kind):
    q = QUEUES[kind]()
    q.put("left")
    q.close()
    for call in (lambda: q.get(timeout=1), q.get_nowait, lambda: q.put(2), lambda: q.put_nowait(3)):
        with pytest.raises(ValueError, match="is closed"):
            call()
    q.join_thread()


@pytest.mark.parametrize("kind", list(QUEUES))
def test_a_child_still_uses_a_queue_the_parent_closed(kind):
    """close() is per process: a copy handed to a child keeps working."""
    q = QUEUES[kind]()
    q.put(["a", "b"], timeout=10)
    child = Child("spawn", children.get_from_queue, q).start()
    q.close()
    assert child.join() == ["a", "b"]
    q.join_thread()


@pytest.mark.parametrize("kind", list(QUEUES))
def test_a_negative_timeout_is_one_already_past(kind):
    """multiprocessing.Queue takes a negative timeout as expired (Empty, Full), not as an
    error."""
    q = QUEUES[kind](maxsize=1)
    with pytest.raises(queue.Empty):
        q.get(timeout=-1)
    q.put("only")
    with pytest.raises(queue.Full):
        q.put("more", timeout=-0.5)
    assert q.get(timeout=10) == "only"
    finish(q)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_items_put_before_a_fork_reach_the_child(kind):
    q = QUEUES[kind]()
    q.put({"a": np.arange(3)})
    q.put("b")
    child = Child("fork", children.get_from_queue, q).start()
    assert np.array_equal(child.join()["a"], np.arange(3))
    assert q.get(timeout=10) == "b"
    finish(q)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_cancel_join_thread(kind):
    q = QUEUES[kind]()
    q.put("left behind")
    q.cancel_join_thread()
    q.close()
    q.join_thread()  # returns at once after cancel_join_thread


def test_tensorslab_queue_keeps_tensor_type():
    q = tensorslab.Queue()
    q.put({"t": torch.arange(4.0)})
    got = q.get(timeout=10)["t"]
    assert type(got) is torch.Tensor and torch.equal(got, torch.arange(4.0))
    del got
    finish(q)
