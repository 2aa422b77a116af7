"""Running test code in child processes, bounded.

`Child` starts a function from `children` (importable, so `spawn` and `forkserver` children
find it) under a given start method. The child writes the function's return value, or its
traceback, to a file; `Child.join` waits until a deadline, kills a hung child and fails the
test with whatever the child said. `run_in_child` is start + join.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import tempfile
import time
from typing import Any, Callable

import pytest

import children
import samples
import tensorslab

START_METHODS = ("spawn", "fork", "forkserver")


class ChildFailed(AssertionError):
    """A child process raised, crashed or hung."""


class Child:
    """One child process running ``target(*args)`` under start method ``ctx_name``.

    Use as a context manager (``with Child(...) as child:``): on exit the child is joined
    (or killed after ``timeout`` seconds from its start), and its failure is raised, unless
    the body itself raised, in which case the child is killed and the body's error wins.
    """

    def __init__(self, ctx_name: str, target: Callable[..., Any], *args: Any, timeout: float = 60):
        self.ctx_name = ctx_name
        self.target = target
        self.args = args
        self.timeout = timeout
        fd, self._result_path = tempfile.mkstemp(prefix="tsl-test-child-", suffix=".pkl")
        os.close(fd)
        ctx = mp.get_context(ctx_name)
        self.process = ctx.Process(
            target=children.run_and_report,
            args=(self._result_path, target, args),
            name=f"{getattr(target, '__name__', 'child')}[{ctx_name}]",
            daemon=True,
        )
        self._deadline = None
        self._joined = False
        self._result = None

    def start(self) -> Child:
        self.process.start()
        self._deadline = time.monotonic() + self.timeout
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def _read_result(self):
        try:
            with open(self._result_path, "rb") as file:
                return pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError):
            return None
        finally:
            try:
                os.unlink(self._result_path)
            except OSError:
                pass

    def join(self, *, expect_exitcode: int | None = 0) -> Any:
        """Wait for the child (until its deadline), then return what the target returned.

        Fails the test if the child hung (it is killed), raised, or exited with a code other
        than ``expect_exitcode`` (None: any code, e.g. for a child that is killed on purpose).
        """
        assert self._deadline is not None, "start() the child first"
        if self._joined:
            return self._result
        self._joined = True
        self.process.join(max(0.0, self._deadline - time.monotonic()))
        name = self.process.name
        if self.process.is_alive():
            self.kill()
            self._read_result()
            raise ChildFailed(f"child {name} still running after {self.timeout} s: killed")
        result = self._read_result()
        if result is not None and result[0] == "error":
            raise ChildFailed(f"child {name} raised:\n{result[1]}")
        code = self.process.exitcode
        if expect_exitcode is not None and code != expect_exitcode:
            raise ChildFailed(f"child {name} exited with code {code} (expected {expect_exitcode})")
        self._result = None if result is None else result[1]
        return self._result

    def __enter__(self) -> Child:
        if self._deadline is None:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._joined = True
            self.kill()
            self._read_result()
            return
        self.join()


def run_in_child(ctx_name: str, target: Callable[..., Any], *args: Any, timeout: float = 60) -> Any:
    """Run ``target(*args)`` in a child started with ``ctx_name``; return its result.

    The test fails if the child raises (with the child's traceback), crashes, or is still
    running after ``timeout`` seconds (it is killed).
    """
    return Child(ctx_name, target, *args, timeout=timeout).start().join()


def echo_through_child(ctx_name: str, kind: str, values: dict, **channel_options) -> None:
    """Send each sample of `kind` to a child that compares it with its own copy and sends it
    back; fail with every difference seen in the child or back in the parent."""
    out_tx, out_rx = tensorslab.channel(**channel_options)
    back_tx, back_rx = tensorslab.channel(**channel_options)
    problems = []
    child = Child(ctx_name, children.echo_samples, kind, out_rx, back_tx, timeout=100)
    with child:
        for name, value in values.items():
            out_tx.put((name, value), timeout=60)
            got_name, echoed, child_problems = back_rx.get(timeout=60)
            assert got_name == name, f"sent {name}, got {got_name} back"
            problems += [f"in the {ctx_name} child: {p}" for p in child_problems]
            problems += [
                f"back in the parent: {p}" for p in samples.differences(echoed, value, name)
            ]
            del echoed
        out_tx.close()
        assert child.join() == len(values)
    for handle in (out_rx, back_tx, back_rx):
        handle.close()
    assert not problems, "round trip through a child changed values:\n  " + "\n  ".join(
        p[:2000] for p in problems
    )


def get_until_closed(rx, *, timeout: float = 30, limit: int = 1_000_000) -> list:
    """Receive from ``rx`` until it raises `tensorslab.Closed`; every get is bounded."""
    received = []
    for _ in range(limit):
        try:
            received.append(rx.get(timeout=timeout))
        except tensorslab.Closed:
            return received
    pytest.fail(f"more than {limit} messages and still not closed")
