"""``spawn`` and ``start_processes`` with the semantics of ``torch.multiprocessing``'s.

``fn(i, *args)`` runs in each of ``nprocs`` processes. When one fails, the others are
terminated (SIGTERM, then SIGKILL after a grace period) and the parent raises: a
``ProcessRaisedException`` carrying the child's traceback when it raised, a
``ProcessExitedException`` with its exit code (and signal name) when it exited or was
killed without raising. A child writes its traceback to a file of its own in a private
temporary directory, removed once the processes are done.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
import warnings
import weakref
from typing import Any, Callable

__all__ = [
    "ProcessContext",
    "ProcessException",
    "ProcessExitedException",
    "ProcessRaisedException",
    "spawn",
    "start_processes",
]

#: How long terminated processes get to exit before they are killed, by default.
TERMINATE_GRACE_SECONDS = 30.0

_PR_SET_PDEATHSIG = 1


class ProcessException(Exception):
    """A process started by :func:`spawn` failed; ``error_index`` is its index (the ``i``
    of ``fn(i, *args)``), ``error_pid`` (also ``pid``) its process id."""

    def __init__(self, msg: str, error_index: int, error_pid: int):
        super().__init__(msg)
        self.msg = msg
        self.error_index = error_index
        self.error_pid = error_pid

    @property
    def pid(self) -> int:
        return self.error_pid

    def __reduce__(self):
        return type(self), (self.msg, self.error_index, self.error_pid)


class ProcessRaisedException(ProcessException):
    """The process raised; the message ends with its traceback."""


class ProcessExitedException(ProcessException):
    """The process exited with a non-zero code without raising, or was killed by a signal
    (``exit_code`` is then minus the signal number, ``signal_name`` e.g. ``"SIGKILL"``)."""

    def __init__(
        self,
        msg: str,
        error_index: int,
        error_pid: int,
        exit_code: int,
        signal_name: str | None = None,
    ):
        super().__init__(msg, error_index, error_pid)
        self.exit_code = exit_code
        self.signal_name = signal_name

    def __reduce__(self):
        args = (self.msg, self.error_index, self.error_pid, self.exit_code, self.signal_name)
        return type(self), args


def _die_with_parent() -> None:
    """SIGINT when the parent dies (Linux ``prctl``), so a child does not outlive the
    ``spawn`` that started it; torch's children do the same."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGINT, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # without it the child only lacks the early exit; nothing else depends on it


def _write_traceback(path: str) -> None:
    with open(path, "w", encoding="utf-8", errors="replace") as file:
        file.write(traceback.format_exc())


def _run(fn: Callable[..., Any], index: int, args: tuple, error_path: str) -> None:
    """The target of every child: ``fn(index, *args)``; on an exception, its traceback goes
    to ``error_path`` and the child exits with code 1."""
    _die_with_parent()
    parent = os.getppid()
    try:
        fn(index, *args)
    except KeyboardInterrupt:
        if os.getppid() != parent:
            return  # the parent died (the SIGINT of _die_with_parent): exit quietly
        _write_traceback(error_path)
        sys.exit(128 + signal.SIGINT)
    except Exception:
        _write_traceback(error_path)
        sys.exit(1)


class ProcessContext:
    """The processes of one :func:`start_processes` call (``join=False``)."""

    def __init__(self, processes: list, error_paths: list[str], error_directory: str):
        self.processes = processes
        self.error_files = error_paths
        self.sentinels = {process.sentinel: index for index, process in enumerate(processes)}
        self._cleanup = weakref.finalize(self, shutil.rmtree, error_directory, ignore_errors=True)

    def pids(self) -> list[int]:
        return [int(process.pid) for process in self.processes]

    def join(self, timeout: float | None = None, grace_period: float | None = None) -> bool:
        """Wait up to ``timeout`` (None: until one exits) for the processes.

        Returns True once all have exited successfully, False if some are still running.
        When one exited with a non-zero code, the others get ``grace_period`` seconds (None:
        none) to exit, are then terminated, killed if still alive after another grace period
        (30 s if None), and the failure is raised; each later call raises that of another
        process that failed (terminated ones included) until none is left, as torch's.
        """
        if not self.sentinels:
            return True
        ready = multiprocessing.connection.wait(list(self.sentinels), timeout=timeout)
        failed = None
        for sentinel in ready:
            index = self.sentinels.pop(sentinel)
            process = self.processes[index]
            process.join()
            if process.exitcode != 0:
                failed = index
                break
        if failed is None:
            if not self.sentinels:
                self._cleanup()
            return not self.sentinels
        self._stop_the_others(grace_period)
        failure = self._failure(failed)
        # As torch's: the processes not joined yet stay, so the next join reports the next
        # failure (another that raised, or one terminated here); their files stay till then.
        if not self.sentinels:
            self._cleanup()
        raise failure

    def _join_all(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))

    def _stop_the_others(self, grace_period: float | None) -> None:
        if grace_period is not None:
            self._join_all(grace_period)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        self._join_all(TERMINATE_GRACE_SECONDS if grace_period is None else grace_period)
        for process in self.processes:
            if process.is_alive():
                process.kill()
            process.join()

    def _failure(self, index: int) -> ProcessException:
        process = self.processes[index]
        try:
            with open(self.error_files[index], encoding="utf-8") as file:
                trace = file.read()
        except OSError:
            trace = ""
        if trace:
            message = f"\n\n-- Process {index} terminated with the following error:\n{trace}"
            return ProcessRaisedException(message, index, process.pid)
        code = process.exitcode
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"<Unknown signal {-code}>"
            message = f"process {index} terminated with signal {name}"
            return ProcessExitedException(message, index, process.pid, code, name)
        message = f"process {index} terminated with exit code {code}"
        return ProcessExitedException(message, index, process.pid, code)


def start_processes(
    fn: Callable[..., Any],
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext | None:
    """Start ``nprocs`` processes running ``fn(i, *args)`` with ``start_method``; with
    ``join``, wait for all of them (raising the first failure), else return their
    :class:`ProcessContext`."""
    ctx = multiprocessing.get_context(start_method)
    directory = tempfile.mkdtemp(prefix="tsl-spawn-errors-")
    paths = [os.path.join(directory, f"process-{index}.txt") for index in range(nprocs)]
    processes = []
    try:
        for index in range(nprocs):
            process = ctx.Process(target=_run, args=(fn, index, args, paths[index]), daemon=daemon)
            process.start()
            processes.append(process)
    except BaseException:
        for process in processes:
            process.kill()
            process.join()
        shutil.rmtree(directory, ignore_errors=True)
        raise
    context = ProcessContext(processes, paths, directory)
    if not join:
        return context
    while not context.join():
        pass
    return None


def spawn(
    fn: Callable[..., Any],
    args: tuple = (),
    nprocs: int = 1,
    join: bool = True,
    daemon: bool = False,
    start_method: str = "spawn",
) -> ProcessContext | None:
    """``torch.multiprocessing.spawn``: :func:`start_processes` that always uses ``spawn``
    (another ``start_method`` gets torch's ``FutureWarning`` and is ignored)."""
    if start_method != "spawn":
        warnings.warn(
            f"spawn() only supports start_method='spawn' (got {start_method!r}); "
            "use start_processes(...) for another start method",
            FutureWarning,
            stacklevel=2,
        )
    return start_processes(fn, args, nprocs, join, daemon, start_method="spawn")
