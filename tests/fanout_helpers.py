"""Parent-side helpers of test_broadcast.py and test_latest.py."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import signal
import time

import fanout_children
import helpers

CONTEXTS = ("fork", "spawn")


class Child(helpers.Child):
    """`helpers.Child`, started through `fanout_children.run_and_report`: a spawn child
    then imports NumPy but not torch (unless its target does), seconds faster."""

    def __init__(self, ctx_name, target, *args, timeout: float = 60):
        super().__init__(ctx_name, target, *args, timeout=timeout)
        self.process = mp.get_context(ctx_name).Process(
            target=fanout_children.run_and_report,
            args=(self._result_path, target, args),
            name=self.process.name,
            daemon=True,
        )


def kill(child: Child) -> None:
    """SIGKILL, and wait until the process is gone."""
    os.kill(child.pid, signal.SIGKILL)
    child.process.join(30)
    assert not child.process.is_alive(), f"child {child.pid} survived SIGKILL"
    child.join(expect_exitcode=None)


def wait_until(condition, *, timeout: float = 30, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.02)


def occupancy(handle) -> tuple[int, int]:
    """(messages_in_flight, slab_used_bytes), after collecting this process's garbage."""
    gc.collect()
    stats = handle.stats()
    return stats["messages_in_flight"], stats["slab_used_bytes"]


class Agent:
    """A child running `fanout_children.subscriber_agent`: `ask` sends it a command and
    returns its reply, failing with the child's own error if it died meanwhile."""

    def __init__(self, ctx_name: str, sub, *, timeout: float = 90):
        ctx = mp.get_context(ctx_name)
        self.commands, self.replies = ctx.Queue(), ctx.Queue()
        self.child = Child(
            ctx_name,
            fanout_children.subscriber_agent,
            sub,
            self.commands,
            self.replies,
            timeout=timeout,
        ).start()
        assert self.reply() == "started"

    def send(self, *command) -> None:
        self.commands.put(command)

    def reply(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.replies.get(timeout=0.1)
            except queue.Empty:
                if not self.child.process.is_alive():
                    self.child.join()
                    pid = self.child.pid
                    raise helpers.ChildFailed(f"agent {pid} exited without replying") from None
                assert time.monotonic() < deadline, f"no reply from agent after {timeout} s"

    def ask(self, *command):
        self.send(*command)
        return self.reply()

    def stop(self) -> None:
        self.send("stop")
        self.child.join()

    def kill(self) -> None:
        kill(self.child)

    def __enter__(self) -> Agent:
        return self

    def __exit__(self, exc_type, _exc, _tb) -> None:
        self.child.kill()
        try:
            self.child.join(expect_exitcode=None)
        except helpers.ChildFailed:
            if exc_type is None:
                raise
