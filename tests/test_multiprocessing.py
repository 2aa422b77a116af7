"""`tensorslab.multiprocessing`: the names of `multiprocessing`/`torch.multiprocessing`, with
queues, pipes and pools that carry arrays and tensors through slabs.

The queue tests follow the behaviours of CPython's own (`Lib/test/_test_multiprocessing.py`:
`_TestQueue`, `TestSimpleQueue`), run across fork and spawn children; the pipe tests are in
test_multiprocessing_pipe.py. "In the slab" is checked by the address of what arrived
(`mp_children.in_slab`), not by a counter.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import queue as pyqueue
import signal
import subprocess
import sys
import tempfile

import numpy as np
import pytest

import mp_children
import tensorslab
import tensorslab.multiprocessing as tmp
from helpers import Child, ChildFailed

METHODS = ("fork", "spawn")
WAIT = 60


# --- the module ----------------------------------------------------------------------------


def test_importing_it_imports_neither_torch_nor_numpy():
    code = (
        "import sys, tensorslab.multiprocessing;"
        "print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_multiprocessing_name_is_there_and_only_the_transports_are_ours():
    ours = {"Queue", "SimpleQueue", "JoinableQueue", "Pipe", "Pool", "get_context"}
    for name in multiprocessing.__all__:
        assert name in tmp.__all__, name
        if name not in ours and name != "reducer":
            assert getattr(tmp, name) is getattr(multiprocessing, name), name
    for name in (
        "spawn",
        "start_processes",
        "ProcessContext",
        "ProcessRaisedException",
        "ProcessExitedException",
        "set_sharing_strategy",
    ):
        assert name in tmp.__all__, name
    assert tmp.Queue is tensorslab.Queue
    assert tmp.Process is multiprocessing.Process
    assert issubclass(tmp.ProcessRaisedException, tmp.ProcessException)


@pytest.mark.parametrize("method", METHODS)
def test_a_context_has_our_transports_and_the_standard_library_for_the_rest(method):
    ctx = tmp.get_context(method)
    assert ctx is tmp.get_context(method)
    assert isinstance(ctx, multiprocessing.context.BaseContext)
    assert ctx.get_start_method() == method
    assert ctx.Process is multiprocessing.get_context(method).Process
    assert isinstance(ctx.Queue(), tensorslab.Queue)
    assert isinstance(ctx.SimpleQueue(), tmp.SimpleQueue)
    assert isinstance(ctx.JoinableQueue(), tmp.JoinableQueue)
    assert all(isinstance(end, tmp.Connection) for end in ctx.Pipe())
    assert type(ctx.Lock()) is type(multiprocessing.get_context(method).Lock())
    assert ctx.get_context() is ctx


# --- Queue and JoinableQueue (_TestQueue) ---------------------------------------------------

QUEUES = {"Queue": tmp.Queue, "JoinableQueue": tmp.JoinableQueue}


@pytest.mark.parametrize("kind", list(QUEUES))
@pytest.mark.parametrize("method", METHODS)
def test_put_with_block_and_timeout(kind, method):
    ctx = tmp.get_context(method)
    q = getattr(ctx, kind)(6)
    child_can_start, parent_can_continue = ctx.Event(), ctx.Event()
    with Child(
        method, mp_children.get_six_when_told, q, child_can_start, parent_can_continue
    ) as child:
        assert q.empty() and not q.full()
        q.put(1)
        q.put(2, True)
        q.put(3, True, None)
        q.put(4, False)
        q.put(5, False, None)
        q.put_nowait(6)
        assert not q.empty() and q.full() and q.qsize() == 6
        for call in (
            lambda: q.put(7, False),
            lambda: q.put(7, False, None),
            lambda: q.put_nowait(7),
            lambda: q.put(7, True, 0.05),
            lambda: q.put(7, False, 0.05),
            lambda: q.put(7, True, timeout=0.05),
        ):
            with pytest.raises(pyqueue.Full):
                call()
        child_can_start.set()
        assert parent_can_continue.wait(WAIT)
        assert child.join() == [1, 2, 3, 4, 5, 6]
    assert q.empty() and not q.full()
    if kind == "JoinableQueue":
        for _ in range(6):
            q.task_done()
        assert q.join(timeout=WAIT)  # the failed puts were not counted


@pytest.mark.parametrize("kind", list(QUEUES))
@pytest.mark.parametrize("method", METHODS)
def test_get_with_block_and_timeout(kind, method):
    ctx = tmp.get_context(method)
    q = getattr(ctx, kind)()
    child_can_start, parent_can_continue = ctx.Event(), ctx.Event()
    with Child(method, mp_children.put_four_when_told, q, child_can_start, parent_can_continue):
        assert q.empty()
        child_can_start.set()
        assert parent_can_continue.wait(WAIT)
        assert not q.empty()
        assert q.get(True, None) == 2
        assert q.get(True) == 3
        assert q.get(timeout=WAIT) == 4
        assert q.get_nowait() == 5
        assert q.empty()
        for call in (
            lambda: q.get(False),
            lambda: q.get(False, None),
            q.get_nowait,
            lambda: q.get(True, 0.05),
            lambda: q.get(False, 0.05),
            lambda: q.get(timeout=0.05),
        ):
            with pytest.raises(pyqueue.Empty):
                call()


@pytest.mark.parametrize("method", METHODS)
def test_a_child_puts_after_the_parent_in_order(method):
    q = tmp.Queue()
    for value in range(10):
        q.put(value)
    with Child(method, mp_children.put_ten_to_twenty, q):
        assert [q.get(timeout=WAIT) for _ in range(20)] == list(range(20))
    with pytest.raises(pyqueue.Empty):
        q.get(False)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_qsize(kind):
    q = QUEUES[kind]()
    assert q.qsize() == 0
    q.put(1)
    assert q.qsize() == 1
    q.put(5)
    assert q.qsize() == 2
    q.get(timeout=WAIT)
    assert q.qsize() == 1
    q.get(timeout=WAIT)
    assert q.qsize() == 0


class NotSerializable:
    def __reduce__(self):
        raise AttributeError("not today")


@pytest.mark.parametrize("kind", list(QUEUES))
def test_an_unpicklable_put_fails_at_once_and_the_queue_keeps_working(kind):
    """multiprocessing.Queue drops such an item in its feeder thread (and prints); ours has
    no feeder: the put raises, counts nothing, and the queue goes on (bpo-30414, bpo-33078)."""
    q = QUEUES[kind](maxsize=1)
    with pytest.raises(tensorslab.EncodeError, match="pickling it failed"):
        q.put(NotSerializable())
    with pytest.raises(tensorslab.EncodeError):
        q.put(lambda: 1)  # as in the standard library, lambdas do not pickle
    assert q.qsize() == 0
    q.put(True)
    assert q.get(timeout=WAIT) is True
    assert q.empty()
    if kind == "JoinableQueue":
        q.task_done()
        assert q.join(timeout=WAIT)


@pytest.mark.parametrize("kind", list(QUEUES))
def test_a_closed_queue_refuses_put_and_get(kind):
    q = QUEUES[kind]()
    q.close()
    with pytest.raises(ValueError, match="is closed"):
        q.put("foo")
    with pytest.raises(ValueError, match="is closed"):
        q.get()


STDLIB_AND_OURS = {
    "multiprocessing.Queue": multiprocessing.Queue,
    "multiprocessing.JoinableQueue": multiprocessing.JoinableQueue,
    **QUEUES,
}


@pytest.mark.parametrize("kind", list(STDLIB_AND_OURS))
def test_empty_after_close_as_the_standard_library(kind):
    """CPython's test_closed_queue_empty_exceptions: close() of a queue this process never
    put to changes nothing for empty(); once it has put, empty() raises OSError."""
    unused = STDLIB_AND_OURS[kind]()
    unused.close()
    unused.join_thread()
    assert unused.empty()
    used = STDLIB_AND_OURS[kind]()
    used.put("foo")
    used.close()
    used.join_thread()
    with pytest.raises(OSError, match="is closed"):
        used.empty()
    assert used.qsize() == 1


@pytest.mark.parametrize("method", METHODS)
def test_joinable_queue_task_done_and_join_across_processes(method):
    ctx = tmp.get_context(method)
    tasks, results = ctx.JoinableQueue(), ctx.Queue()
    workers = [Child(method, mp_children.work_until_none, tasks, results) for _ in range(2)]
    joiner = Child(method, mp_children.join_queue, tasks)
    for worker in workers:
        worker.start()
    for index in range(10):
        tasks.put((index, np.full(1000, index)))
    assert tasks.join(timeout=WAIT)
    got = sorted((results.get(timeout=WAIT) for _ in range(10)), key=lambda r: r[0])
    assert [r[0] for r in got] == list(range(10))
    assert all(np.array_equal(r[1], np.full(1000, 2 * r[0])) for r in got)
    assert all(r[2] for r in got), "a task's array did not arrive in the slab"
    assert all(mp_children.array_in_slab(r[1]) for r in got)
    del got
    with joiner:  # join() in a child returns too: nothing is unfinished
        assert joiner.join() is True
    for _ in workers:
        tasks.put(None)
    assert sum(worker.join() for worker in workers) == 10
    assert tasks.join(timeout=WAIT)


def test_task_done_called_too_many_times():
    q = tmp.JoinableQueue()
    q.put(1)
    q.task_done()
    with pytest.raises(ValueError, match=r"task_done\(\) called too many times"):
        q.task_done()
    assert q.join(timeout=WAIT) and q.qsize() == 1  # counted done, though still queued
    assert q.get(timeout=WAIT) == 1


def test_joinable_queue_goes_to_children_as_an_argument_only():
    """As the standard library's: its semaphore may only be inherited."""
    q, carrier = tmp.JoinableQueue(), tmp.Queue()
    with pytest.raises(tensorslab.EncodeError, match="inheritance"):
        carrier.put(q)


# --- SimpleQueue (TestSimpleQueue) ----------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_simple_queue_empty(method):
    ctx = tmp.get_context(method)
    q = ctx.SimpleQueue()
    child_can_start, parent_can_continue = ctx.Event(), ctx.Event()
    with Child(method, mp_children.put_emptiness_twice, q, child_can_start, parent_can_continue):
        assert q.empty()
        child_can_start.set()
        assert parent_can_continue.wait(WAIT)
        assert not q.empty()
        assert q.get() is True
        assert q.get() is False
        assert q.empty()


def test_simple_queue_close():
    q = tmp.SimpleQueue()
    q.close()
    q.close()  # twice is fine
    assert q._reader.closed and q._writer.closed
    for call in (q.get, lambda: q.put(1), q.empty):
        with pytest.raises(OSError, match="closed"):
            call()


@pytest.mark.parametrize("method", METHODS)
def test_simple_queue_get_gives_eof_once_every_writer_is_gone(method):
    q = tmp.SimpleQueue()
    with Child(method, mp_children.put_then_exit, q, [np.arange(3), "last"]):
        q._writer.close()  # as the pool's worker closes its copy: only the child can put now
    first = q.get()
    assert np.array_equal(first, np.arange(3)) and mp_children.array_in_slab(first)
    assert q.get() == "last"
    with pytest.raises(EOFError):
        q.get()


def test_simple_queue_put_gives_broken_pipe_once_every_reader_is_gone():
    q = tmp.SimpleQueue()
    q._reader.close()
    with pytest.raises(BrokenPipeError):
        q.put(1)


@pytest.mark.parametrize("method", METHODS)
def test_concurrent_futures_process_pool_takes_one_of_our_contexts(method):
    """Once failed: ProcessPoolExecutor(mp_context=ctx) makes its result queue with
    ctx.SimpleQueue() and waits on its ``_reader`` with multiprocessing.connection.wait;
    ours had no descriptor ("Invalid file object"), its manager thread died at once and
    every future stayed pending."""
    import concurrent.futures

    q = tmp.get_context(method).SimpleQueue()
    assert multiprocessing.connection.wait([q._reader], timeout=0) == []
    q.put(np.arange(3))
    assert multiprocessing.connection.wait([q._reader], timeout=WAIT) == [q._reader]
    assert q._reader.poll(0) and np.array_equal(q._reader.recv(), np.arange(3))
    assert not q._reader.poll(0)
    del q
    context = tmp.get_context(method)
    with concurrent.futures.ProcessPoolExecutor(2, mp_context=context) as executor:
        squares = executor.map(mp_children.square, range(6), timeout=WAIT)
        assert list(squares) == [x * x for x in range(6)]
        # The tasks go through the executor's own (standard) queue; results through ours.
        _, plus_one = executor.submit(mp_children.where_it_arrived, np.arange(10)).result(WAIT)
    assert np.array_equal(plus_one, np.arange(10) + 1) and mp_children.array_in_slab(plus_one)
    del plus_one


# --- spawn / start_processes ----------------------------------------------------------------


def start(method, fn, args, nprocs):
    if method == "spawn":
        return tmp.spawn(fn, args, nprocs=nprocs, join=False)
    return tmp.start_processes(fn, args, nprocs=nprocs, join=False, start_method=method)


def join_until_done(context):
    for _ in range(10):
        if context.join(timeout=WAIT):
            return
    pytest.fail("processes still running")


@pytest.mark.parametrize("method", METHODS)
def test_a_child_exception_is_reraised_with_its_traceback_and_the_others_terminated(method):
    with tempfile.TemporaryDirectory() as markers:
        context = start(method, mp_children.fail_one_wait_others, (1, markers), nprocs=3)
        with pytest.raises(tmp.ProcessRaisedException) as raised:
            join_until_done(context)
        started = os.listdir(markers)
    error = raised.value
    assert error.error_index == 1 and error.pid == error.error_pid == context.pids()[1]
    assert "-- Process 1 terminated with the following error:" in str(error)
    assert "ValueError: boom in process 1" in str(error)
    assert "mp_children.py" in str(error) and "fail_one_wait_others" in str(error)
    for index in (0, 2):
        process = context.processes[index]
        assert not process.is_alive()
        # Terminated, unless it had not even started fn when the failure was seen.
        assert process.exitcode == -signal.SIGTERM or f"started-{index}" not in started
    # As torch's: the terminated processes are failures too, reported by the next joins.
    with pytest.raises(tmp.ProcessExitedException, match="signal SIGTERM"):
        context.join()


@pytest.mark.parametrize("method", METHODS)
def test_a_child_killed_by_a_signal(method):
    context = start(method, mp_children.die_by_signal, (0,), nprocs=2)
    with pytest.raises(tmp.ProcessExitedException) as exited:
        join_until_done(context)
    error = exited.value
    assert (error.error_index, error.exit_code, error.signal_name) == (0, -9, "SIGKILL")
    assert "terminated with signal SIGKILL" in str(error)
    assert not context.processes[1].is_alive()


def test_the_exceptions_pickle_with_their_fields():
    import pickle

    raised = pickle.loads(pickle.dumps(tmp.ProcessRaisedException("trace", 2, 1234)))
    assert (type(raised), str(raised), raised.error_index, raised.pid) == (
        tmp.ProcessRaisedException,
        "trace",
        2,
        1234,
    )
    exited = pickle.loads(pickle.dumps(tmp.ProcessExitedException("m", 0, 99, -9, "SIGKILL")))
    assert (exited.error_pid, exited.exit_code, exited.signal_name) == (99, -9, "SIGKILL")


def test_a_join_after_a_failure_reports_the_next_failure_as_torchs_does():
    """Once failed: after the first failure was raised, join() forgot the other processes
    and returned True ("all exited successfully") though the other one had raised too;
    torch's join raises that one's failure, with its traceback."""
    context = start("fork", mp_children.exit_with_traceback, (), nprocs=2)
    with pytest.raises(tmp.ProcessRaisedException) as first:
        join_until_done(context)
    with pytest.raises(tmp.ProcessException) as second:
        join_until_done(context)
    assert {first.value.error_index, second.value.error_index} == {0, 1}
    if isinstance(second.value, tmp.ProcessRaisedException):  # not terminated first
        assert f"failing in process {second.value.error_index}" in str(second.value)
    assert context.join() is True  # now nothing is left to report


def test_a_child_exit_code():
    with pytest.raises(tmp.ProcessExitedException, match="exit code 3") as exited:
        tmp.start_processes(mp_children.exit_with, (3,), nprocs=1, start_method="fork")
    assert exited.value.exit_code == 3 and exited.value.signal_name is None


def test_join_false_gives_a_context_to_join():
    q = tmp.Queue()
    with pytest.warns(FutureWarning, match="start_processes"):
        context = tmp.spawn(
            mp_children.put_index_and_array, (q,), nprocs=2, join=False, start_method="fork"
        )
    assert isinstance(context, tmp.ProcessContext)
    assert len(context.pids()) == 2 and len(context.processes) == 2
    join_until_done(context)
    got = sorted((q.get(timeout=WAIT) for _ in range(2)), key=lambda item: item[0])
    assert [(i, method) for i, _, method in got] == [(0, "spawn"), (1, "spawn")]  # not fork
    assert np.array_equal(got[1][1], np.full(3, 1)) and mp_children.array_in_slab(got[1][1])
    assert all(p.exitcode == 0 for p in context.processes)


# --- Pool -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_pool_map_imap_starmap_apply_async_through_the_slab(method):
    assert not mp_children.array_in_slab(np.arange(1000))  # the check can tell
    with tmp.get_context(method).Pool(2) as pool:
        assert pool.map(mp_children.square, range(10)) == [x * x for x in range(10)]
        assert pool.map(mp_children.square, range(10), chunksize=3) == [x * x for x in range(10)]
        assert list(pool.imap(mp_children.square, range(5))) == [0, 1, 4, 9, 16]
        assert sorted(pool.imap_unordered(mp_children.square, range(5))) == [0, 1, 4, 9, 16]
        assert pool.starmap(mp_children.multiply, [(1, 2), (3, 4)]) == [2, 12]
        assert pool.apply(mp_children.multiply, (6, 7)) == 42
        arrived, plus_one = pool.apply_async(mp_children.where_it_arrived, (np.arange(1000),)).get(
            WAIT
        )
        assert arrived, "the task's array did not arrive in the worker's slab"
        assert np.array_equal(plus_one, np.arange(1000) + 1) and mp_children.array_in_slab(plus_one)
        del plus_one
        if method == "fork":  # tensors too (a spawn worker would have to import torch)
            import torch

            arrived, result = pool.apply_async(
                mp_children.tensor_where_it_arrived, (torch.ones(4, 4),)
            ).get(WAIT)
            assert arrived and type(result) is torch.Tensor
            assert torch.equal(result, torch.ones(4, 4) + 1) and mp_children.tensor_in_slab(result)
            del result


@pytest.mark.parametrize("pool_class", [multiprocessing.get_context("fork").Pool, tmp.Pool])
def test_pool_worker_raising_and_unpicklable_tasks_as_the_standard_library(pool_class):
    with pool_class(2) as pool:
        failed = pool.apply_async(mp_children.raise_value_error, (5,))
        with pytest.raises(ValueError, match="bad value 5") as raised:
            failed.get(WAIT)
        assert "raise_value_error" in str(raised.value.__cause__)  # the remote traceback
        with pytest.raises(ValueError, match="bad value"):
            pool.map(mp_children.raise_value_error, range(3))
        with pytest.raises(Exception):  # noqa: B017  (PicklingError there, EncodeError here)
            pool.apply_async(lambda x: x, (1,)).get(WAIT)
        assert pool.map(mp_children.square, [3]) == [9]  # still working


@pytest.mark.parametrize("method", METHODS)
def test_pool_maxtasksperchild_replaces_workers(method):
    with tmp.get_context(method).Pool(1, maxtasksperchild=2) as pool:
        pids = pool.map(mp_children.pid_of_worker, range(6), chunksize=1)
    assert len(set(pids)) == 3


@pytest.mark.parametrize("method", METHODS)
def test_pool_terminate_stops_busy_workers_and_close_join_finishes_work(method):
    ctx = tmp.get_context(method)
    pool = ctx.Pool(2)
    pending = pool.apply_async(mp_children.sleep_long, (0,))
    workers = list(pool._pool)
    pool.terminate()
    pool.join()
    assert not pending.ready()
    assert all(not worker.is_alive() for worker in workers)

    pool = ctx.Pool(2)
    results = pool.map_async(mp_children.square, range(20))
    pool.close()
    pool.join()
    assert results.get(WAIT) == [x * x for x in range(20)]
    with pytest.raises(ValueError):
        pool.apply_async(mp_children.square, (1,))


def test_pool_accepts_our_context():
    with tmp.Pool(1, context=tmp.get_context("fork")) as pool:
        assert pool.map(mp_children.square, [2, 3]) == [4, 9]


# --- what the channel pickles, it pickles as multiprocessing does ------------------------------


def test_a_multiprocessing_connection_through_a_queue_to_a_spawn_child():
    """Once failed: the channel pickled with plain pickle.dumps, so the Connection arrived
    holding the sender's descriptor number ("Bad file descriptor" in the child)."""
    a, b = multiprocessing.Pipe()
    q = tmp.Queue()
    q.put(b)  # multiprocessing.Queue duplicates the descriptor for the receiver
    child = Child("spawn", mp_children.send_on_stdlib_connection_from_queue, q).start()
    try:
        child.join()
        delivered = a.poll(0) and a.recv() == "hello"
    except ChildFailed:
        delivered = False
    del child, q  # the failure's traceback must not keep the channel (the leak check)
    assert delivered


def test_torch_dataloader_takes_one_of_our_contexts():
    """DataLoader accepts only a BaseContext; with ours its result queue is a channel."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    dataset = TensorDataset(torch.arange(40.0).reshape(20, 2))
    loader = DataLoader(
        dataset, batch_size=5, num_workers=2, multiprocessing_context=tmp.get_context("fork")
    )
    batches = [batch for (batch,) in loader]
    assert torch.equal(torch.cat(batches), dataset.tensors[0])
    assert all(mp_children.tensor_in_slab(batch) for batch in batches)
    del batches


def test_tensors_inside_pickled_objects_skip_torchs_descriptor_reducers():
    """ForkingPickler carries torch's reducers once torch.multiprocessing is imported; the
    channel leaves them out, so a tensor inside a pickled object is neither moved into a
    file of its own (one descriptor per tensor) nor tied to its sender's lifetime."""
    import torch
    import torch.multiprocessing  # noqa: F401 (registers torch's reducers)

    tensor = torch.arange(1000.0)
    q = tmp.Queue()
    q.put(mp_children.Holder(tensor))
    assert not tensor.is_shared(), "torch's reducer moved the sender's tensor"
    got = q.get(timeout=WAIT)
    assert isinstance(got, mp_children.Holder) and torch.equal(got.value, tensor)


def test_joinable_queue_counts_what_put_async_puts():
    import asyncio

    q = tmp.JoinableQueue(1)

    async def scenario():
        await q.put_async("counted")
        with pytest.raises(tensorslab.Full):
            await q.put_async("no room", timeout=0)  # failed: must not be counted

    asyncio.run(scenario())
    assert not q.join(timeout=0), "the put_async was not counted"
    assert q.get(timeout=WAIT) == "counted"
    q.task_done()
    assert q.join(timeout=WAIT), "the failed put_async left a count behind"


@pytest.mark.parametrize("name", ["Queue", "SimpleQueue", "JoinableQueue"])
def test_queue_classes_take_a_type_parameter_as_the_standard_librarys_do(name):
    """`Queue[int]` in an annotation evaluated at run time (the standard library's classes
    allow it; ours raised TypeError: 'type' object is not subscriptable)."""
    cls = getattr(tmp, name)
    alias = cls[int]
    assert alias.__origin__ is cls and alias.__args__ == (int,)


def test_a_reducer_registered_after_the_first_message_is_used():
    """The channel's pickler caches ForkingPickler's table: a registration made after it
    was built (a reducer added, then replaced) must still take effect."""
    from multiprocessing.reduction import ForkingPickler

    q = tmp.Queue()
    q.put(mp_children.Holder(1))  # builds the cached table
    assert q.get(timeout=WAIT).value == 1
    try:
        ForkingPickler.register(
            mp_children.Registered, lambda obj: (mp_children.rebuild_registered, (obj.value,))
        )
        q.put(mp_children.Registered(2))
        assert q.get(timeout=WAIT).value == ("rebuilt by the registered reducer", 2)
        ForkingPickler.register(
            mp_children.Registered, lambda obj: (mp_children.Registered, (-obj.value,))
        )
        q.put(mp_children.Registered(3))
        assert q.get(timeout=WAIT).value == -3
    finally:
        ForkingPickler._extra_reducers.pop(mp_children.Registered, None)
