"""Review of broadcast/latest: each test is a suspected bug, expected to fail on main."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import time

import pytest

import tensorslab

CHILD_TIMEOUT = 20


def _wait_child(pid: int) -> int:
    deadline = time.monotonic() + CHILD_TIMEOUT
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    raise AssertionError("child did not finish")


def test_bare_fork_inherited_subscriber_counts():
    """README: after a bare os.fork() every inherited handle counts. The child's inherited
    subscriber must survive the parent closing its copy."""
    pub, sub = tensorslab.broadcast(depth=4)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 1
        try:
            os.close(write_end)
            os.read(read_end, 1)  # the parent closed its copy and published
            code = 0 if sub.get(timeout=5) == "hello" else 2
        except BaseException as error:  # noqa: BLE001
            os.write(2, f"child: {type(error).__name__}: {error}\n".encode())
            code = 3
        finally:
            os._exit(code)
    os.close(read_end)
    sub.close()
    pub.put("hello", timeout=5)
    os.write(write_end, b"x")
    os.close(write_end)
    assert _wait_child(pid) == 0, "the forked child's inherited subscriber was dropped"
    pub.close()


def _child_get(sub, expected):
    try:
        got = sub.get(timeout=10)
    except BaseException as error:  # noqa: BLE001
        print(f"child: {type(error).__name__}: {error}", flush=True)
        os._exit(3)
    os._exit(0 if got == expected else 2)


def test_mp_fork_close_subscriber_right_after_start():
    """README: closing the parent's copy right after Process.start() is safe. With the
    fork start method nothing keeps the subscriber alive between the fork and the
    child's adopt()."""
    ctx = multiprocessing.get_context("fork")
    failures = []
    for attempt in range(5):
        pub, sub = tensorslab.broadcast(depth=4)
        process = ctx.Process(target=_child_get, args=(sub, attempt))
        process.start()
        sub.close()
        try:
            pub.put(attempt, timeout=5)
        except tensorslab.TensorslabError as error:
            failures.append(f"put: {error!r}")
        process.join(CHILD_TIMEOUT)
        if process.exitcode != 0:
            failures.append(f"attempt {attempt}: child exit {process.exitcode}")
        pub.close()
    assert not failures, failures


def test_rebuild_subscriber_out_of_range_index_is_an_error_not_a_panic():
    """The entry index of a subscriber ticket is used unchecked (subscribers[index])."""
    pub, sub = tensorslab.broadcast(depth=2)
    rebuild, (state, index, generation) = sub.__reduce__()
    try:
        rebuild(state, 5000, generation)
    except BaseException as error:  # noqa: BLE001
        assert isinstance(error, Exception) and not type(error).__name__ == "PanicException", (
            f"{type(error).__module__}.{type(error).__name__}: {error}"
        )
    finally:
        sub.close()
        pub.close()


def _reader_child(reader, started, ready):
    started.set()  # registered: the parent's pending entry is redeemed by now
    ready.wait(10)
    try:
        version, value = reader.get(timeout=5)
    except BaseException as error:  # noqa: BLE001
        print(f"child: {type(error).__name__}: {error}", flush=True)
        os._exit(3)
    os._exit(0 if value == "weights" else 2)


def test_mp_fork_handed_reader_counts():
    """The README's learner/actor pattern with the fork start method: the reader handed
    to the actor must count at once, so the learner may close its own copy."""
    ctx = multiprocessing.get_context("fork")
    writer, reader = tensorslab.latest()
    started, ready = ctx.Event(), ctx.Event()
    process = ctx.Process(target=_reader_child, args=(reader, started, ready))
    process.start()
    reader.close()
    assert started.wait(10)
    try:
        writer.publish("weights", timeout=5)
    finally:
        ready.set()
        process.join(CHILD_TIMEOUT)
        writer.close()
    assert process.exitcode == 0


def test_same_process_copies_of_one_subscriber_share_and_survive():
    pub, sub = tensorslab.broadcast(depth=2)
    copy = pickle.loads(pickle.dumps(sub))
    sub.close()
    pub.put(1, timeout=2)
    pub.put(2, timeout=2)
    assert copy.get(timeout=2) == 1
    del copy  # the last handle: no subscriber is left, so the publisher is told
    with pytest.raises(tensorslab.Closed):
        pub.put(3, timeout=2)
    pub.close()


def test_drop_oldest_missed_and_held_view_survives_eviction():
    np = pytest.importorskip("numpy")
    pub, sub = tensorslab.broadcast(depth=2, overflow="drop_oldest")
    pub.put(np.full(1000, 1.0))
    view = sub.get(timeout=2)
    for n in range(2, 8):
        pub.put(np.full(1000, float(n)))
    assert (view == 1.0).all()
    assert sub.get(timeout=2)[0] == 6.0
    assert sub.missed == 4
    pub.close()
    sub.close()
