"""What test_asyncio.py runs in child processes. Imports neither torch nor the suite's
`children` (a spawn child starts in a fraction of a second). Every wait has a timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time

import numpy as np

import tensorslab
from child_runner import run_and_report  # noqa: F401  (re-exported: the entry point)

TIMEOUT = 30


def message(seq: int) -> dict:
    return {"seq": seq, "a": np.full(64 + seq % 7, seq, dtype=np.int64)}


def check(msg: dict) -> int:
    """The message's seq, after checking its payload is the one `message` made."""
    seq = msg["seq"]
    assert msg["a"].shape == (64 + seq % 7,) and (msg["a"] == seq).all(), f"message {seq} torn"
    return seq


def produce(tx, count: int, started) -> int:
    """Puts `count` messages (blocking), then closes."""
    started.set()
    for seq in range(count):
        tx.put(message(seq), timeout=TIMEOUT)
    tx.close()
    return count


def consume_until_closed(rx, started) -> list[int]:
    """Synchronous consumer: every seq it took, until Closed."""
    started.set()
    seqs = []
    while True:
        try:
            msg = rx.get(timeout=TIMEOUT)
        except tensorslab.Closed:
            return seqs
        seqs.append(check(msg))
        del msg


def hold(handle, started) -> None:
    """Holds `handle` until killed (bounded)."""
    started.set()
    time.sleep(TIMEOUT)


def drain_after(rx, go, count: int) -> list[int]:
    """Waits for `go`, then takes `count` messages."""
    assert go.wait(TIMEOUT), "never told to drain"
    seqs = [check(rx.get(timeout=TIMEOUT)) for _ in range(count)]
    rx.close()
    return seqs


def read_subscriber(sub, started) -> list[int]:
    """Reads a broadcast subscriber until Closed."""
    started.set()
    return [check(msg) for msg in sub]


def write_versions(writer, count: int, go) -> int:
    """Publishes versions 1..count, each once told to, then closes."""
    for version in range(1, count + 1):
        assert go.wait(TIMEOUT), f"never told to publish version {version}"
        go.clear()
        assert writer.publish({"version": version}) == version
    writer.close()
    return count


def interrupted_while_awaiting(rx, awaiting, interrupted) -> tuple:
    """`asyncio.run` awaiting `get_async` until Ctrl-C; then a plain `get` on the same
    channel. Returns how the run ended and what the plain get took."""
    signal.signal(signal.SIGINT, signal.default_int_handler)

    async def main():
        getting = asyncio.ensure_future(rx.get_async(timeout=TIMEOUT))
        # After the get's first step (the wait is armed when this runs).
        asyncio.get_running_loop().call_soon(awaiting.set)
        return await getting

    try:
        outcome = ("returned", check(asyncio.run(main())))
    except KeyboardInterrupt:
        outcome = ("KeyboardInterrupt", None)
    interrupted.set()
    after = check(rx.get(timeout=TIMEOUT))
    rx.close()
    return outcome, after


def helper_threads() -> int:
    return sum(thread.name == "tensorslab-aio" for thread in threading.enumerate())


def async_round_trip(tx, rx, count: int, env: dict) -> tuple:
    """In a loop of this process: a consumer task and a producer task through a channel
    (the ring smaller than `count`, so both wait); returns the seqs and the number of helper
    threads. `env` is set first (the futex_waitv fallback switch)."""
    os.environ.update(env)

    async def main():
        async def producer():
            for seq in range(count):
                await tx.put_async(message(seq), timeout=TIMEOUT)

        async def consumer():
            return [check(await rx.get_async(timeout=TIMEOUT)) for _ in range(count)]

        got, _ = await asyncio.gather(consumer(), producer())
        return got

    got = asyncio.run(main())
    return got, helper_threads()
