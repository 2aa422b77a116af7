"""Idle cost: what processes attached to a channel, and doing nothing with it, spend on
noticing peers that die.

The processes of a channel share one sweep for dead peers per interval (100 ms), whoever
claims it first, rather than each process sweeping every peer every interval: n processes
cost one O(n) sweep per interval channel-wide, not n of them. The tests count sweeps
(`stats()["liveness_sweeps"]`, channel-wide) and check that a sweeper that stops or dies
does not stop dead peers from being noticed, by the watchers and by blocked calls.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest

import tensorslab

# The sweep interval of the core (`REAP_INTERVAL`): claims are at least this far apart.
INTERVAL = 0.1
ATTACH_TIMEOUT = 60.0
NOTICE_TIMEOUT = 30.0


def _hold(handle, ready) -> None:
    handle.qsize()  # a fork child registers on its first use of the handle
    ready.release()
    time.sleep(120)  # ended by SIGKILL (stopped children could not take part in a wake-up)


def _start(ctx, handle, count: int, ready) -> list:
    children = [ctx.Process(target=_hold, args=(handle, ready), daemon=True) for _ in range(count)]
    for child in children:
        child.start()
    for _ in children:
        assert ready.acquire(timeout=ATTACH_TIMEOUT), "a child did not attach"
    return children


def _end(children: list) -> None:
    for child in children:
        child.kill()
    for child in children:
        child.join()


def _wait_until_gone(handle, pids: set[int]) -> None:
    deadline = time.monotonic() + NOTICE_TIMEOUT
    while left := pids & set(handle.stats()["processes"]):
        assert time.monotonic() < deadline, f"dead peers {sorted(left)} not noticed in time"
        time.sleep(0.02)


@pytest.mark.parametrize("count", [2, 24])
def test_idle_processes_share_one_sweep_per_interval(count):
    ctx = mp.get_context("fork")
    tx, rx = tensorslab.channel(capacity=4)
    ready = ctx.Semaphore(0)
    children = _start(ctx, rx, count, ready)
    try:
        first = rx.stats()["liveness_sweeps"]
        started = time.monotonic()
        time.sleep(1.0)
        swept = rx.stats()["liveness_sweeps"] - first
        elapsed = time.monotonic() - started
        # A bound no slowness can break: each claim moves the due time one interval on,
        # so claims are an interval apart whatever the number of processes (today's code
        # had each of the count + 1 processes sweep every interval).
        bound = elapsed / INTERVAL + 2
        assert swept <= bound, (
            f"{swept} sweeps in {elapsed:.2f} s by {count + 1} processes (at most {bound:.0f})"
        )
        # And sweeps go on (bounded wait, not a rate).
        deadline = time.monotonic() + NOTICE_TIMEOUT
        while rx.stats()["liveness_sweeps"] - first < swept + 3:
            assert time.monotonic() < deadline, "sweeps stopped"
            time.sleep(0.05)
    finally:
        _end(children)
        tx.close()
        rx.close()


def test_a_dead_peer_is_noticed_while_every_other_peer_is_stopped():
    # Whichever child was sweeping (or about to) is stopped, some of them perhaps half-way
    # through a sweep: this process must take the sweep over and notice the dead one.
    ctx = mp.get_context("fork")
    tx, rx = tensorslab.channel(capacity=4)
    ready = ctx.Semaphore(0)
    children = _start(ctx, rx, 8, ready)
    try:
        for child in children[1:]:
            os.kill(child.pid, signal.SIGSTOP)
        victim = children[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        _wait_until_gone(rx, {victim.pid})
        assert set(rx.stats()["processes"]) >= {child.pid for child in children[1:]}
    finally:
        _end(children)
        tx.close()
        rx.close()


def test_a_sweeper_killed_with_its_peer_does_not_stop_sweeps():
    ctx = mp.get_context("fork")
    tx, rx = tensorslab.channel(capacity=4)
    ready = ctx.Semaphore(0)
    children = _start(ctx, rx, 8, ready)
    try:
        # Every child but one dies at once, the sweeper among them if it was a child; the
        # last child and this process notice all of them.
        for child in children[:-1]:
            os.kill(child.pid, signal.SIGKILL)
        for child in children[:-1]:
            child.join()
        _wait_until_gone(rx, {child.pid for child in children[:-1]})
        assert children[-1].pid in rx.stats()["processes"]
    finally:
        _end(children)
        tx.close()
        rx.close()


def test_a_blocked_get_notices_its_dead_sender_while_the_other_peers_are_stopped():
    ctx = mp.get_context("fork")
    tx, rx = tensorslab.channel(capacity=4)
    ready = ctx.Semaphore(0)
    sender = _start(ctx, tx, 1, ready)
    others = _start(ctx, rx, 6, ready)
    tx.close()
    try:
        for child in others:
            os.kill(child.pid, signal.SIGSTOP)
        os.kill(sender[0].pid, signal.SIGKILL)
        sender[0].join()
        with pytest.raises(tensorslab.PeerGone):
            rx.get(timeout=NOTICE_TIMEOUT)
    finally:
        _end(sender + others)
        rx.close()
