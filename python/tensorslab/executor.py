"""``tensorslab.ProcessPoolExecutor``: a drop-in for ``concurrent.futures.ProcessPoolExecutor``.

Tasks and results travel through two tensorslab channels instead of pipes: the arrays and
tensors in a task's arguments or a task's result are copied once into a slab and arrive as
zero-copy views; functions and every other object are pickled, as the standard library does
(the channel's encoder pickles what it has no encoding for).

How the parts fit (the standard library's design, with channels in place of its queues):

- ``submit`` records a work item and, while fewer than ``max_workers + 1`` tasks are in the
  task channel or running, puts the task itself: there is no feeder thread, so the copy is
  made in the caller. The others wait in a local queue, where ``Future.cancel`` still
  works; a task that reached the channel is running and cannot be cancelled.
- Every worker pulls from the one task channel (each task goes to exactly one worker) and
  puts its result, or its exception with the formatted traceback, on the result channel.
- One manager thread per executor takes results, completes the futures, sends queued tasks
  as room frees, replaces workers that reached ``max_tasks_per_child``, and notices a worker
  that died: every pending future then fails with ``BrokenProcessPool``, the other workers
  are terminated and reaped, and the channels close.

What the executor must never do: keep a result after completing its future (the result's
views hold slab memory until the user drops them), keep a task's arguments after copying
them, or wait without a bound on something a dead worker would never do.
"""

from __future__ import annotations

import collections
import itertools
import multiprocessing as mp
import os
import threading
import time
import weakref
from concurrent.futures import Executor, Future, InvalidStateError
from concurrent.futures import _base as futures_base
from concurrent.futures.process import (
    BrokenProcessPool,
    _ExceptionWithTraceback,
    _RemoteTraceback,
)
from functools import partial
from traceback import format_exception
from typing import Any, Callable, Iterable, Iterator

from ._tensorslab import Receiver, Sender, channel
from .exceptions import Closed, Empty, Full

__all__ = ["BrokenProcessPool", "ProcessPoolExecutor"]

#: Tasks sent beyond one per worker, as the standard library's ``EXTRA_QUEUED_CALLS``: a
#: worker finds its next task waiting, and the rest stay cancellable.
EXTRA_QUEUED_CALLS = 1

#: How often the manager thread looks for dead workers while no result arrives. A worker
#: that dies is noticed within this time (a ``waitpid(WNOHANG)`` per worker); results never
#: wait for it, since a result wakes the thread at once.
WORKER_CHECK_SECONDS = 0.1

#: A channel admits 256 processes (its process table): the parent and this many workers.
MAX_WORKERS = 255

#: The standard library's words, so code that matches on them keeps working.
BROKEN_POOL = "A child process terminated abruptly, the process pool is not usable anymore"
BROKEN_FUTURE = (
    "A process in the process pool was terminated abruptly while the future was running or pending."
)

_global_shutdown = False
_managers: weakref.WeakSet[_Manager] = weakref.WeakSet()


def _python_exit() -> None:
    # As the standard library: at interpreter exit, pending work still runs, then every
    # worker is stopped and joined (before the threading module joins its threads).
    global _global_shutdown
    _global_shutdown = True
    # A forked worker inherits the set: only this process's own managers are its to stop.
    managers = [manager for manager in list(_managers) if manager.owner_pid == os.getpid()]
    for manager in managers:
        manager.begin_shutdown()
    for manager in managers:
        manager.join()


threading._register_atexit(_python_exit)  # type: ignore[attr-defined]


# --- the worker process -------------------------------------------------------------------


def _process_chunk(fn: Callable[..., Any], chunk: tuple[tuple[Any, ...], ...]) -> list[Any]:
    """One task of ``map(..., chunksize=n)``: ``fn`` applied to each argument tuple."""
    return [fn(*args) for args in chunk]


def _get_chunks(*iterables: Iterable[Any], chunksize: int) -> Iterator[tuple[Any, ...]]:
    """``zip(*iterables)`` in tuples of ``chunksize``."""
    zipped = zip(*iterables)
    while chunk := tuple(itertools.islice(zipped, chunksize)):
        yield chunk


def _chain_from_iterable_of_lists(lists: Iterable[list[Any]]) -> Iterator[Any]:
    """Flattens the chunks' result lists, holding no reference to what it has yielded."""
    for element in lists:
        element.reverse()
        while element:
            yield element.pop()


def _send_back(results: Sender, work_id: int, result: Any, exception: Any, exit_pid: Any) -> None:
    try:
        results.put((work_id, exception, result, exit_pid))
    except BaseException as error:
        # The result (or exception) could not be sent, e.g. it does not pickle: the future
        # gets that error instead, as the standard library's worker does.
        failure = _ExceptionWithTraceback(error, error.__traceback__)
        results.put((work_id, failure, None, exit_pid))


def _process_worker(
    tasks: Receiver,
    results: Sender,
    initializer: Callable[..., Any] | None,
    initargs: tuple[Any, ...],
    max_tasks: int | None,
) -> None:
    """A worker's life: run tasks from ``tasks`` until a ``None``, ``max_tasks`` of them,
    or the parent's end of the channel is gone."""
    if initializer is not None:
        try:
            initializer(*initargs)
        except BaseException:
            # As the standard library: log and exit; the parent sees a worker that died
            # and breaks the pool.
            futures_base.LOGGER.critical("Exception in initializer:", exc_info=True)
            return
    done = 0
    while True:
        try:
            task = tasks.get()
        except Closed:
            return  # the parent closed or died: nobody is left to send tasks
        if task is None:
            return
        work_id, fn, args, kwargs = task
        del task
        done += 1
        exit_pid = os.getpid() if max_tasks is not None and done >= max_tasks else None
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            failure = _ExceptionWithTraceback(error, error.__traceback__)
            del error, fn, args, kwargs  # release the task's views before sending
            _send_back(results, work_id, None, failure, exit_pid)
            del failure
        else:
            del fn, args, kwargs
            _send_back(results, work_id, result, None, exit_pid)
            del result
        if exit_pid is not None:
            return


# --- the parent's side --------------------------------------------------------------------


class _WorkItem:
    __slots__ = ("future", "fn", "args", "kwargs")

    def __init__(self, future: Future, fn: Callable[..., Any], args: tuple, kwargs: dict):
        self.future, self.fn, self.args, self.kwargs = future, fn, args, kwargs


def _fail(failed: list[tuple[Future, BaseException]]) -> None:
    """Fails the futures :meth:`_Manager._send_queued` could not send (lock released);
    re-raises a ``KeyboardInterrupt`` (or other non-``Exception``) among their errors."""
    interrupt = None
    for future, error in failed:
        future.set_exception(error)
        if not isinstance(error, Exception):
            interrupt = error
    if interrupt is not None:
        raise interrupt


class _Manager(threading.Thread):
    """The state of one executor and the thread that serves it.

    ``lock`` guards every field below that two threads use (the caller's ``submit`` and
    ``shutdown``, and this thread). Futures are completed outside the lock, since their
    done-callbacks may call ``submit``.
    """

    def __init__(self, max_workers, mp_context, initializer, initargs, max_tasks_per_child):
        super().__init__(name="tensorslab.ProcessPoolExecutor manager")
        self.max_workers = max_workers
        self.context = mp_context
        self.initializer, self.initargs = initializer, initargs
        self.max_tasks_per_child = max_tasks_per_child
        self.dynamic_spawn = mp_context.get_start_method(allow_none=False) != "fork"
        self.lock = threading.Lock()
        self.work: dict[int, _WorkItem] = {}  # submitted and not completed
        self.queued: collections.deque[int] = collections.deque()  # not yet sent: cancellable
        self.in_flight = 0  # sent and not yet answered
        self.work_ids = itertools.count()
        self.processes: dict[int, Any] = {}  # pid -> live (or not yet reaped) Process
        self.leaving: set[int] = set()  # pids that announced their exit
        self.broken: str | None = None
        self.shutting_down = False
        self.started = False
        self.closed = False
        self.owner_pid = os.getpid()
        # Tasks: one slot per possible in-flight task, plus one stop sentinel per worker.
        capacity = max(64, 2 * max_workers + EXTRA_QUEUED_CALLS)
        self.tasks_tx, self.tasks_rx = channel(capacity)
        # Results: the parent keeps a sender of its own to wake this thread (a None).
        self.results_tx, self.results_rx = channel(capacity)

    # -- called by the executor, from any thread ----------------------------------------

    def submit(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> Future:
        with self.lock:
            if self.broken:
                raise BrokenProcessPool(self.broken)
            if self.shutting_down:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if _global_shutdown:
                raise RuntimeError("cannot schedule new futures after interpreter shutdown")
            future: Future = Future()
            work_id = next(self.work_ids)
            self.work[work_id] = _WorkItem(future, fn, args, kwargs)
            self.queued.append(work_id)
            if self.dynamic_spawn:
                self._adjust_process_count()
            if not self.started:
                if not self.dynamic_spawn:
                    # Fork every worker before this process has the manager thread, as the
                    # standard library does: forking a process with threads can deadlock.
                    while len(self.processes) < self.max_workers:
                        self._spawn_process()
                self.started = True
                _managers.add(self)
                self.start()
            failed = self._send_queued()
        _fail(failed)
        return future

    def begin_shutdown(self, cancel_futures: bool = False) -> None:
        cancelled = []
        with self.lock:
            self.shutting_down = True
            if cancel_futures:
                while self.queued:
                    work_id = self.queued.popleft()
                    cancelled.append(self.work.pop(work_id).future)
            started = self.started
        for future in cancelled:
            future.cancel()
        if started:
            self._wake()
        else:
            self._close_channels()

    # -- helpers that run with the lock held --------------------------------------------

    def _adjust_process_count(self) -> None:
        # One worker per task not yet completed, up to max_workers: the standard library's
        # rule ("a new worker only when none is idle") without its idle-worker semaphore,
        # which keeps the credits of retired workers and then starts no replacement while
        # tasks wait (the max_tasks_per_child hang of CPython gh-115634).
        outstanding = self.in_flight + len(self.queued)
        while len(self.processes) < min(self.max_workers, outstanding):
            self._spawn_process()

    def _spawn_process(self) -> None:
        process = self.context.Process(
            target=_process_worker,
            args=(
                self.tasks_rx,
                self.results_tx,
                self.initializer,
                self.initargs,
                self.max_tasks_per_child,
            ),
        )
        process.start()
        self.processes[process.pid] = process

    def _send_queued(self) -> list[tuple[Future, BaseException]]:
        """Moves queued tasks into the task channel while there is room in flight.

        Returns the futures whose task could not be sent, with the error, for the caller to
        fail once it has released the lock (their done-callbacks may call ``submit``). A
        ``KeyboardInterrupt`` in a put (blocked on a full slab) ends the loop: its future
        is among them, and :func:`_fail` raises it again.
        """
        failed: list[tuple[Future, BaseException]] = []
        while self.queued and self.in_flight < self.max_workers + EXTRA_QUEUED_CALLS:
            work_id = self.queued.popleft()
            item = self.work[work_id]
            if not item.future.set_running_or_notify_cancel():
                del self.work[work_id]
                continue
            try:
                self.tasks_tx.put((work_id, item.fn, item.args, item.kwargs))
            except BaseException as error:
                # The task could not be encoded (e.g. a lambda): its future fails, as with
                # the standard library's feeder thread.
                cause = "".join(format_exception(type(error), error, error.__traceback__))
                error.__cause__ = _RemoteTraceback(f'\n"""\n{cause}"""')
                del self.work[work_id]
                failed.append((item.future, error))
                if not isinstance(error, Exception):
                    break
                continue
            # The slab holds the copy now: the caller's arrays are theirs again.
            item.fn = item.args = item.kwargs = None
            self.in_flight += 1
        return failed

    # -- the thread ---------------------------------------------------------------------

    def run(self) -> None:
        try:
            self._serve()
        except BaseException as error:
            # An undecodable result (its task is unknown), or a bug here: the pool breaks,
            # as the standard library's does when unpickling a result fails.
            self._terminate_broken(format_exception(type(error), error, error.__traceback__))

    def _serve(self) -> None:
        next_check = time.monotonic() + WORKER_CHECK_SECONDS
        while True:
            try:
                message = self.results_rx.get(timeout=WORKER_CHECK_SECONDS)
            except Empty:
                message = None
            if message is not None:
                self._process_result(message)
            del message  # a result's views must not outlive its future here
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + WORKER_CHECK_SECONDS
                if self._a_worker_died():
                    self._terminate_broken(None)
                    return
            with self.lock:
                finished = self.shutting_down and not self.work
            if finished:
                self._stop_workers()
                return

    def _wake(self) -> None:
        sender = self.results_tx
        if sender is None:
            return  # the channels are closed and dropped: the thread has stopped
        try:
            sender.put_nowait(None)
        except (Full, Closed, ValueError):
            pass  # the ring is full (the thread wakes anyway) or the executor already closed

    def _process_result(self, message: tuple) -> None:
        work_id, exception, result, exit_pid = message
        del message
        with self.lock:
            item = self.work.pop(work_id, None)
            self.in_flight -= 1
        if item is not None:
            try:
                if exception is not None:
                    item.future.set_exception(exception)
                else:
                    item.future.set_result(result)
            except InvalidStateError:
                pass  # completed meanwhile (e.g. failed while the pool broke)
        del item, result, exception
        leaving = None
        if exit_pid is not None:
            # It reached max_tasks_per_child and exits after this put: reap it (outside
            # the lock: its exit takes a while), then replace it.
            with self.lock:
                self.leaving.add(exit_pid)
                leaving = self.processes.pop(exit_pid, None)
            if leaving is not None:
                leaving.join()
        with self.lock:
            if exit_pid is not None:
                self._adjust_process_count()
            failed = self._send_queued()
        _fail(failed)

    def _a_worker_died(self) -> bool:
        with self.lock:
            exited = [
                pid for pid, process in self.processes.items() if process.exitcode is not None
            ]
        if not exited:
            return False
        # A worker that announced its exit in its last result may be seen gone before that
        # result is read: read what is queued first.
        while True:
            try:
                message = self.results_rx.get_nowait()
            except Empty:
                break
            if message is not None:
                self._process_result(message)
            del message
        with self.lock:
            return any(pid not in self.leaving for pid in exited)

    def _terminate_broken(self, cause: list[str] | None) -> None:
        with self.lock:
            self.broken = BROKEN_POOL
            self.shutting_down = True
            items = list(self.work.values())
            self.work.clear()
            self.queued.clear()
            processes = list(self.processes.values())
            self.processes.clear()
        error = BrokenProcessPool(BROKEN_FUTURE)
        if cause is not None:
            error.__cause__ = _RemoteTraceback(f"\n'''\n{''.join(cause)}'''")
        for item in items:
            try:
                item.future.set_exception(error)
            except InvalidStateError:
                pass  # cancelled by its owner meanwhile
        del items
        for process in processes:
            process.terminate()
        for process in processes:
            process.join(10)
            if process.exitcode is None:  # ignored SIGTERM
                process.kill()
                process.join()
        self._close_channels()

    def _stop_workers(self) -> None:
        with self.lock:
            processes = list(self.processes.values())
        for _ in processes:
            self.tasks_tx.put(None)
        for process in processes:
            process.join()
        with self.lock:
            self.processes.clear()
        self._close_channels()

    def _close_channels(self) -> None:
        with self.lock:
            if self.closed:
                return
            self.closed = True
            handles = (self.tasks_tx, self.tasks_rx, self.results_tx, self.results_rx)
            # Dropped as well as closed: a closed handle keeps its segments mapped (and a
            # grown slab's memory) until it is collected, and the executor object may live
            # long after shutdown. Nothing uses them once closed is set (submit refuses).
            self.tasks_tx = self.tasks_rx = self.results_tx = self.results_rx = None
        for handle in handles:
            handle.close()


class ProcessPoolExecutor(Executor):
    """``concurrent.futures.ProcessPoolExecutor`` whose tasks' and results' arrays and
    tensors cross through shared memory (one copy in, zero-copy views out) instead of
    pickle. Same arguments, methods, futures and errors."""

    def __init__(
        self,
        max_workers: int | None = None,
        mp_context: Any = None,
        initializer: Callable[..., Any] | None = None,
        initargs: tuple[Any, ...] = (),
        *,
        max_tasks_per_child: int | None = None,
    ) -> None:
        # Checks and messages as the standard library's; the limit as its Windows one.
        if max_workers is None:
            count = getattr(os, "process_cpu_count", os.cpu_count)()
            max_workers = min(count or 1, MAX_WORKERS)
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        elif max_workers > MAX_WORKERS:
            raise ValueError(f"max_workers must be <= {MAX_WORKERS}")
        if mp_context is None:
            if max_tasks_per_child is not None:
                mp_context = mp.get_context("spawn")
            else:
                mp_context = mp.get_context()
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
            if mp_context.get_start_method(allow_none=False) == "fork":
                raise ValueError(
                    "max_tasks_per_child is incompatible with the 'fork' multiprocessing "
                    "start method; supply a different mp_context."
                )
        self._max_workers = max_workers
        self._manager = _Manager(
            max_workers, mp_context, initializer, initargs, max_tasks_per_child
        )
        # An executor dropped without shutdown() stops its workers once its pending work
        # is done, as the standard library's does.
        weakref.finalize(self, self._manager.begin_shutdown)

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        return self._manager.submit(fn, args, kwargs)

    submit.__doc__ = Executor.submit.__doc__

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[Any]:
        """``map(fn, *iterables)`` run in the workers, results in order; with
        ``chunksize > 1`` the arguments travel in chunks of that many calls (one task and
        one slab message each way per chunk), as with the standard library."""
        if chunksize < 1:
            raise ValueError("chunksize must be >= 1.")
        results = super().map(
            partial(_process_chunk, fn),
            _get_chunks(*iterables, chunksize=chunksize),
            timeout=timeout,
        )
        return _chain_from_iterable_of_lists(results)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        manager = self._manager
        manager.begin_shutdown(cancel_futures)
        # A done-callback runs in the manager thread: from there, shutdown cannot wait for
        # that thread; it stops once the callback returns.
        if wait and manager.started and threading.current_thread() is not manager:
            manager.join()

    shutdown.__doc__ = Executor.shutdown.__doc__
