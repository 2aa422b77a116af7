"""`tensorslab.ProcessPoolExecutor` behaves as `concurrent.futures.ProcessPoolExecutor`
(where a behaviour is compared, both run the same code), and its arrays and tensors cross
through slabs: zero-copy views on arrival, nothing kept after the user drops a result, no
segment or child process left after `shutdown` or after a worker is killed."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import gc
import multiprocessing as mp
import os
import time
import weakref
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

import numpy as np
import pytest

import executor_children as tasks
import tensorslab

CONTEXTS = ("fork", "spawn")
TIMEOUT = 60  # every wait on a future; spawn workers start slowly on a loaded machine

EXECUTORS = {"stdlib": cf.ProcessPoolExecutor, "tensorslab": tensorslab.ProcessPoolExecutor}


def executor(ctx_name: str, max_workers: int = 1, **options) -> tensorslab.ProcessPoolExecutor:
    return tensorslab.ProcessPoolExecutor(
        max_workers, mp_context=mp.get_context(ctx_name), **options
    )


def reaped(pid: int) -> bool:
    """Gone and reaped: `kill(pid, 0)` still succeeds on a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def assert_gone(pids) -> None:
    assert [pid for pid in pids if not reaped(pid)] == []


@pytest.fixture(autouse=True)
def no_child_left():
    """Every process a test's executors started has been joined when the test ends."""
    before = set(mp.active_children())
    yield
    left = set(mp.active_children()) - before
    assert not left, f"child processes still running or not reaped: {left}"


def wait_until(condition, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"still not {what} after {timeout} s")
        time.sleep(0.01)


def test_exported_lazily_without_torch():
    assert tensorslab.ProcessPoolExecutor is tensorslab.executor.ProcessPoolExecutor
    assert issubclass(tensorslab.ProcessPoolExecutor, cf.Executor)
    assert "ProcessPoolExecutor" in tensorslab.__all__


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_submit_and_map_with_chunks_keep_order(ctx_name):
    arrays = [np.arange(10.0) * i for i in range(23)]
    with executor(ctx_name, 2) as ex:
        future = ex.submit(tasks.power, 3, exponent=3)
        assert isinstance(future, cf.Future)
        assert future.result(TIMEOUT) == 27
        for chunksize in (1, 4, 100):
            got = list(ex.map(tasks.add_one, arrays, timeout=TIMEOUT, chunksize=chunksize))
            assert len(got) == len(arrays)
            for expected, result in zip(arrays, got):
                np.testing.assert_array_equal(result, expected + 1)
        # Two iterables; zip stops at the shorter one, as map does.
        got = list(ex.map(tasks.power, range(7), [2, 3] * 3, chunksize=2))
        assert got == [0, 1, 4, 27, 16, 125]
        with pytest.raises(ValueError, match="chunksize must be >= 1"):
            ex.map(tasks.add_one, arrays, chunksize=0)
        del got, result


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_as_completed_wait_and_run_in_executor(ctx_name, tmp_path):
    gate = tmp_path / "go"
    with executor(ctx_name, 2) as ex:
        futures = {ex.submit(tasks.power, i): i for i in range(8)}
        done = {futures[f]: f.result() for f in cf.as_completed(futures, timeout=TIMEOUT)}
        assert done == {i: i * i for i in range(8)}
        slow, fast = ex.submit(tasks.pid_once_exists, str(gate)), ex.submit(tasks.power, 5)
        finished, _ = cf.wait([slow, fast], timeout=TIMEOUT, return_when=cf.FIRST_COMPLETED)
        assert finished == {fast}  # slow cannot finish before the gate opens
        gate.touch()
        finished, pending = cf.wait([slow, fast], timeout=TIMEOUT)
        assert finished == {slow, fast} and not pending

        async def main():
            loop = asyncio.get_running_loop()
            return await asyncio.gather(
                *(loop.run_in_executor(ex, tasks.add_one, np.full(4, i)) for i in range(4))
            )

        results = asyncio.run(main())
        assert [r.tolist() for r in results] == [[i + 1] * 4 for i in range(4)]
        del results


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_exceptions_carry_the_remote_traceback_as_the_standard_library(ctx_name):
    for kind, make in EXECUTORS.items():
        with make(1, mp_context=mp.get_context(ctx_name)) as ex:
            with pytest.raises(ValueError, match="boom: 7") as raised:
                ex.submit(tasks.boom, 7).result(TIMEOUT)
            cause = raised.value.__cause__
            assert isinstance(cause, _RemoteTraceback), kind
            assert "in boom" in str(cause) and 'raise ValueError(f"boom: {value}")' in str(cause)
            # A result that cannot be sent fails its own future; the pool goes on.
            assert isinstance(ex.submit(tasks.unpicklable_result).exception(TIMEOUT), Exception)
            # A task that cannot be sent (a lambda) likewise.
            with pytest.raises(Exception, match="pickle|lambda"):
                ex.submit(lambda: 1).result(TIMEOUT)
            assert ex.submit(tasks.power, 4).result(TIMEOUT) == 16, kind


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_sigkilled_worker_breaks_the_pool_without_leaks(ctx_name, tmp_path):
    ex = executor(ctx_name, 2)
    pids = {ex.submit(tasks.pid_after, 0.2).result(TIMEOUT) for _ in range(4)}
    killer = ex.submit(tasks.kill_self)
    # These cannot finish (their gate never opens): running or queued when the pool breaks.
    never = str(tmp_path / "never")
    pending = [ex.submit(tasks.pid_once_exists, never) for _ in range(5)]
    for future in [killer, *pending]:
        with pytest.raises(BrokenProcessPool, match="terminated abruptly"):
            future.result(TIMEOUT)
    with pytest.raises(BrokenProcessPool, match="not usable anymore"):
        ex.submit(tasks.power, 2)
    ex.shutdown()
    assert_gone(pids)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_initializer_gets_initargs_and_its_failure_breaks_the_pool(ctx_name):
    with executor(ctx_name, 2, initializer=tasks.remember, initargs=(1, "two")) as ex:
        got = list(ex.map(tasks.pid_after, [0.1] * 4))
        assert ex.submit(tasks.what_was_initialized).result(TIMEOUT) == (1, "two")
    assert_gone(got)
    for make in EXECUTORS.values():
        ex = make(1, mp_context=mp.get_context(ctx_name), initializer=tasks.failing_initializer)
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.power, 2).result(TIMEOUT)
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.power, 2)
        ex.shutdown()


@pytest.mark.parametrize("kind", list(EXECUTORS))
def test_a_result_the_parent_cannot_load_breaks_the_pool_with_the_cause(kind):
    # Its task is unknown once decoding fails: the standard library breaks the pool too.
    ex = EXECUTORS[kind](1, mp_context=mp.get_context("fork"))
    with pytest.raises(BrokenProcessPool) as raised:
        ex.submit(tasks.undecodable_result).result(TIMEOUT)
    assert "this result refuses to be loaded" in str(raised.value.__cause__)
    with pytest.raises(BrokenProcessPool):
        ex.submit(tasks.power, 2)
    ex.shutdown()


def test_constructor_errors_match_the_standard_library():
    fork, spawn = mp.get_context("fork"), mp.get_context("spawn")
    bad = [
        dict(max_workers=0),
        dict(max_workers=-1),
        dict(initializer=3),
        dict(max_tasks_per_child=0, mp_context=spawn),
        dict(max_tasks_per_child="1", mp_context=spawn),
        dict(max_tasks_per_child=1, mp_context=fork),
    ]
    for options in bad:
        errors = []
        for make in EXECUTORS.values():
            with pytest.raises((ValueError, TypeError)) as raised:
                make(**options)
            errors.append((type(raised.value), str(raised.value)))
        assert errors[0] == errors[1], options


def test_max_tasks_per_child_replaces_workers():
    # Spawn: the default context once max_tasks_per_child is given (fork is refused). Not
    # run against the standard library: its pool hangs once a worker retires while tasks
    # are queued (CPython gh-115634, in 3.11 to 3.13.x before the 2026 fix); the map below
    # is that case.
    with tensorslab.ProcessPoolExecutor(1, max_tasks_per_child=2) as ex:
        pids = [ex.submit(tasks.pid_after, 0.0).result(TIMEOUT) for _ in range(6)]
        assert [pids.index(pid) for pid in pids] == [0, 0, 2, 2, 4, 4]
        arrays = list(ex.map(tasks.add_one, [np.ones(1000)] * 5))
        assert all((a == 2).all() for a in arrays)
        del arrays
    with tensorslab.ProcessPoolExecutor(2, max_tasks_per_child=1) as ex:
        pids += list(ex.map(tasks.pid_after, [0.0] * 6))
        assert len(set(pids[-6:])) == 6
    assert_gone(pids)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_shutdown_cancel_futures_and_wait_false(ctx_name, tmp_path):
    gate = tmp_path / "go"
    ex = executor(ctx_name, 1)
    first = ex.submit(tasks.pid_once_exists, str(gate))
    rest = [ex.submit(tasks.power, i) for i in range(10)]
    # Returns at once (the first task cannot finish before the gate opens) and cancels
    # what was not sent yet. One task beyond the worker's may be in the channel already
    # (running, as in the standard library's call queue).
    ex.shutdown(wait=False, cancel_futures=True)
    assert first.running() and not first.done()
    assert sum(f.cancelled() for f in rest) >= len(rest) - 1
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        ex.submit(tasks.power, 1)
    gate.touch()
    pid = first.result(TIMEOUT)  # what was running still runs to the end
    assert all(f.result(TIMEOUT) == 0 for f in rest if not f.cancelled())
    wait_until(lambda: reaped(pid), "reaped")

    ex = executor(ctx_name, 1)
    futures = [ex.submit(tasks.pid_after, 0.05) for _ in range(3)]
    ex.shutdown(wait=True)  # every pending task runs first
    assert all(f.done() for f in futures)
    assert_gone({f.result(0) for f in futures})
    executor(ctx_name).shutdown()  # never used: nothing started, nothing to stop


def test_done_callbacks_may_submit_and_shut_down():
    # They run in the manager thread; it holds no lock of its own while they run.
    ex = executor("fork", 1)
    chained: list = []

    def then_submit(future):
        chained.append(ex.submit(tasks.power, future.result()))
        chained[-1].add_done_callback(lambda _: ex.shutdown())

    ex.submit(tasks.power, 3).add_done_callback(then_submit)
    wait_until(lambda: chained and chained[0].done(), "chained")
    assert chained[0].result() == 81
    ex.shutdown()
    with pytest.raises(RuntimeError, match="after shutdown"):
        ex.submit(tasks.power, 1)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_large_arrays_cross_as_zero_copy_views(ctx_name):
    big = np.arange(4 << 20, dtype=np.float32)  # 16 MiB
    with executor(ctx_name) as ex:
        seen, doubled = ex.submit(tasks.describe_and_double, big).result(TIMEOUT)
        # In the worker: a view into a tensorslab segment (a slab Lease is its base).
        assert seen == {
            "base": "Lease",
            "in_segment": True,
            "writeable": True,
            "sum": float(big.sum()),
        }
        # Back here: the same, and the values.
        assert type(doubled.base).__name__ == "Lease"
        assert tasks.in_segment(tasks.array_address(doubled))
        np.testing.assert_array_equal(doubled, big * 2)
        # The worker's reply is a view of the task's own memory: copied into the result.
        echoed = ex.submit(tasks.echo, {"a": big[:10], "n": 3}).result(TIMEOUT)
        assert echoed["n"] == 3 and echoed["a"].tolist() == big[:10].tolist()
        del doubled, echoed


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_the_executor_keeps_no_result_the_user_dropped(ctx_name):
    with executor(ctx_name) as ex:
        future = ex.submit(tasks.big_result, 32 << 20)
        result = future.result(TIMEOUT)
        assert result.nbytes == 32 << 20 and result[-1] == 7
        gone = weakref.ref(result)
        del future, result
        # Nothing in the executor (its manager thread included) still holds it.
        wait_until(lambda: gc.collect() >= 0 and gone() is None, "released", timeout=10)
        assert ex.submit(tasks.power, 3).result(TIMEOUT) == 9


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_torch_tensors_cross_as_tensors(ctx_name):
    torch = pytest.importorskip("torch")
    tensor = torch.arange(1000, dtype=torch.float64).reshape(10, 100)
    with executor(ctx_name) as ex:
        seen, out = ex.submit(tasks.torch_describe_and_double, tensor).result(TIMEOUT)
        assert seen == {"type": "Tensor", "in_segment": True, "dtype": "torch.float64"}
        assert torch.equal(out["doubled"], tensor * 2)
        assert tasks.in_segment(out["doubled"].untyped_storage().data_ptr())
        assert out["ones"].dtype == torch.int16 and out["ones"].tolist() == [1, 1, 1]
        del out


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for a reaper that is not this process."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_workers_exit_when_the_parent_is_killed(ctx_name, tmp_path):
    # The standard library's workers stay blocked on their call queue here (each of them
    # holds a write end of it; seen with Python 3.11). Ours see the task channel's last
    # sender die, and exit.
    path = tmp_path / "pids"
    # Not a daemon (helpers.Child is): daemonic processes may not start workers.
    parent = mp.get_context(ctx_name).Process(
        target=tasks.orphan_workers, args=(ctx_name, str(path))
    )
    parent.start()
    parent.join(TIMEOUT)
    if parent.exitcode is None:
        parent.kill()
        parent.join()
    assert parent.exitcode == -9
    pids = [int(pid) for pid in path.read_text().split()]
    assert len(pids) == 2
    wait_until(lambda: all(exited(pid) for pid in pids), "exited")


def test_an_executor_dropped_without_shutdown_stops_its_workers():
    ex = executor("fork", 2)
    pids = set(ex.map(tasks.pid_after, [0.05] * 4))
    del ex
    gc.collect()
    wait_until(lambda: all(reaped(pid) for pid in pids), "reaped")


def test_max_workers_stays_within_what_a_channel_admits(monkeypatch):
    # A channel admits 256 processes: the parent and 255 workers. A default of one worker
    # per CPU on a bigger machine started them all and broke the pool at the 256th; refused
    # up front instead, with the words the standard library uses for its Windows limit.
    monkeypatch.setattr(os, "cpu_count", lambda: 512)
    monkeypatch.setattr(os, "process_cpu_count", lambda: 512, raising=False)
    ex = tensorslab.ProcessPoolExecutor()
    assert ex._max_workers == 255
    ex.shutdown()
    with pytest.raises(ValueError, match="max_workers must be <= 255"):
        tensorslab.ProcessPoolExecutor(256)
    tensorslab.ProcessPoolExecutor(255).shutdown()  # nothing started: never used


@pytest.mark.parametrize("broken", [False, True], ids=["shutdown", "broken"])
def test_shutdown_releases_the_segments_while_the_executor_lives(broken):
    # A closed handle keeps its segments mapped (a grown slab's memory with them) until it
    # is collected, and an executor object often outlives its shutdown (a global, an
    # attribute); the standard library's holds no pipe once shut down.
    from tensorslab.testing import leaked_segments

    before = set(leaked_segments())
    ex = executor("fork", 1)
    assert ex.submit(tasks.big_result, 8 << 20).result(TIMEOUT).nbytes == 8 << 20
    if broken:
        with pytest.raises(BrokenProcessPool):
            ex.submit(tasks.kill_self).result(TIMEOUT)
    ex.shutdown()
    gc.collect()
    assert [leak for leak in leaked_segments() if leak not in before] == []
    ex.shutdown()  # again: nothing left to close
    with pytest.raises((RuntimeError, BrokenProcessPool)):
        ex.submit(tasks.power, 2)
