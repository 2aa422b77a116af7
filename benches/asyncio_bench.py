#!/usr/bin/env python3
"""asyncio consumers side by side: tensorslab's ``get_async`` against the usual way of
awaiting a ``multiprocessing.Queue`` (``loop.run_in_executor(None, q.get)``).

    python benches/asyncio_bench.py           # full run
    python benches/asyncio_bench.py --smoke   # seconds: tiny counts (a check that it runs)

Two cases, each with a producer process (spawn) and the consumer in this process's event
loop: a round trip of a small message (the loop puts, the child echoes it back, the loop
awaits the echo; median microseconds), and a stream of 1 MiB float32 arrays from the child
(messages/s; the consumer reads one byte per 4 KiB page). No figure is a pass/fail assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import platform
import statistics
import time

import numpy as np

import tensorslab

MiB = 1 << 20


def touch(array: np.ndarray) -> int:
    return int(array.reshape(-1).view(np.uint8)[::4096].sum())


# --- children ------------------------------------------------------------------------------


def echo_tensorslab(rx, tx) -> None:
    for msg in rx:
        tx.put(msg)
    tx.close()


def echo_queue(inbox, outbox) -> None:
    while (msg := inbox.get()) is not None:
        outbox.put(msg)
    outbox.put(None)


def stream_tensorslab(tx, count: int) -> None:
    array = np.ones(MiB // 4, np.float32)
    for _ in range(count):
        tx.put(array)
    tx.close()


def stream_queue(outbox, count: int) -> None:
    array = np.ones(MiB // 4, np.float32)
    for _ in range(count):
        outbox.put(array)
    outbox.put(None)


# --- the loop's side -------------------------------------------------------------------------


def small(i: int) -> dict:
    return {"i": i, "x": np.zeros(16, np.float32)}


async def round_trip_tensorslab(ctx, count: int) -> list[float]:
    out_tx, out_rx = tensorslab.channel(8)
    back_tx, back_rx = tensorslab.channel(8)
    child = ctx.Process(target=echo_tensorslab, args=(out_rx, back_tx))
    child.start()
    out_rx.close()
    back_tx.close()
    times = []
    for i in range(count):
        started = time.perf_counter()
        await out_tx.put_async(small(i))
        msg = await back_rx.get_async(timeout=30)
        times.append(time.perf_counter() - started)
        assert msg["i"] == i
    out_tx.close()
    child.join(30)
    back_rx.close()
    return times


async def round_trip_queue(ctx, count: int) -> list[float]:
    loop = asyncio.get_running_loop()
    inbox, outbox = ctx.Queue(8), ctx.Queue(8)
    child = ctx.Process(target=echo_queue, args=(inbox, outbox))
    child.start()
    times = []
    for i in range(count):
        started = time.perf_counter()
        await loop.run_in_executor(None, inbox.put, small(i))
        msg = await loop.run_in_executor(None, outbox.get, True, 30)
        times.append(time.perf_counter() - started)
        assert msg["i"] == i
    inbox.put(None)
    await loop.run_in_executor(None, outbox.get, True, 30)
    child.join(30)
    return times


async def stream_tensorslab_loop(ctx, count: int) -> float:
    tx, rx = tensorslab.channel(8)
    child = ctx.Process(target=stream_tensorslab, args=(tx, count))
    child.start()
    tx.close()
    first = await rx.get_async(timeout=30)  # the child has started: time from here
    touch(first)
    del first
    started, got = time.perf_counter(), 1
    async for array in rx:
        touch(array)
        got += 1
    elapsed = time.perf_counter() - started
    child.join(30)
    rx.close()
    assert got == count
    return (count - 1) / elapsed


async def stream_queue_loop(ctx, count: int) -> float:
    loop = asyncio.get_running_loop()
    outbox = ctx.Queue(8)
    child = ctx.Process(target=stream_queue, args=(outbox, count))
    child.start()
    touch(await loop.run_in_executor(None, outbox.get, True, 30))
    started, got = time.perf_counter(), 1
    while (array := await loop.run_in_executor(None, outbox.get, True, 30)) is not None:
        touch(array)
        got += 1
    elapsed = time.perf_counter() - started
    child.join(30)
    assert got == count
    return (count - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny counts, seconds")
    args = parser.parse_args()
    trips, messages = (50, 20) if args.smoke else (2000, 500)
    ctx = mp.get_context("spawn")
    print(f"{platform.processor() or platform.machine()}, {mp.cpu_count()} cores, "
          f"Linux {platform.release()}, Python {platform.python_version()}")
    print(f"round trip of a small message ({trips}x), median; stream of {messages} x 1 MiB")
    rows = []
    for name, trip, stream in (
        ("tensorslab get_async/put_async", round_trip_tensorslab, stream_tensorslab_loop),
        ("mp.Queue + run_in_executor", round_trip_queue, stream_queue_loop),
    ):
        times = asyncio.run(trip(ctx, trips))
        rate = asyncio.run(stream(ctx, messages))
        rows.append((name, statistics.median(times) * 1e6, rate))
    base = rows[1]
    print(f"{'':32} {'round trip us':>14} {'1 MiB msg/s':>12}")
    for name, micros, rate in rows:
        print(f"{name:32} {micros:14.0f} {rate:12.0f}")
    print(f"ratio (tensorslab vs mp.Queue): round trip {base[1] / rows[0][1]:.1f}x faster, "
          f"stream {rows[0][2] / base[2]:.1f}x the rate")


if __name__ == "__main__":
    main()
