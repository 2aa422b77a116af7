"""Issue 14's benchmark: small messages, many processes, latency, idle cost, cold starts.

Prints the issue's Targets table (case | target | measured | ratio | met?) with the real peers
measured beside tensorslab in the same run, then the details, and writes every raw figure to
``benches/results/small.json``. Run with ``.venv-bench/bin/python`` (``make bench``) to have
the peers; without them their rows say "not installed".

Throughput: producer and consumer processes (``spawn``) loop on ``put``/``get`` of one numpy
``uint8`` array of the size; the consumer touches each message (one byte per 4 KiB page,
``payloads.touch``). The parent lets them warm up, opens a window by flipping a shared phase
word, closes it after ``window_s``, and counts what the consumers got inside it. Each side
also sums the time spent inside its own ``put``/``get`` calls (``perf_counter_ns`` around
each), so put and get are reported separately. The null transport is the same loop with no
transport at all (one process: read the phase word, the two timer pairs, touch): the floor
every transport's time per message is reported above.

``--smoke``: a few seconds, small cases only, never fails for timing reasons (CI).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from multiprocessing.sharedctypes import RawArray
from pathlib import Path
from typing import Any

import numpy as np
from payloads import touch
from peers import CTX, Peer, Tensorslab, Unsupported, all_peers, array_of
from peers import FasterFifo as FasterFifoPeer
from peers import MpQueue as MpQueuePeer

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
RESULTS = Path(__file__).resolve().parent / "results" / "small.json"
WARMUP, MEASURE, STOP = 0, 1, 2


def human(nbytes: int) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if nbytes >= size:
            return f"{nbytes // size} {unit}"
    return f"{nbytes} B"


def capacity_for(nbytes: int) -> int:
    """8 messages in flight, fewer when 8 would pin more than 256 MiB."""
    return max(2, min(8, (256 * MiB) // max(nbytes, 1)))


# ---------------------------------------------------------------------------------------------
# Children: every child reports an exception's traceback through ``errors`` and exits.


def _run_child(errors: Any, fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except BaseException:
        errors.put(traceback.format_exc())
        raise SystemExit(1) from None


def _producer(
    peer: Peer, handle: Any, nbytes: int, phase: Any, stats: Any, slot: int, ready: Any
) -> None:
    array = np.full(nbytes, 7, np.uint8)
    end = peer.sender(handle)
    clock = time.perf_counter_ns
    count = spent = 0
    with ready.get_lock():
        ready.value += 1
    while True:
        now = phase[0]
        if now == STOP:
            break
        start = clock()
        ok = end.put(array, 1.0)
        took = clock() - start
        if ok and now == MEASURE:
            count += 1
            spent += took
    stats[2 * slot], stats[2 * slot + 1] = count, spent


def _consumer(peer: Peer, handle: Any, phase: Any, stats: Any, slot: int, ready: Any) -> None:
    end = peer.receiver(handle)
    clock = time.perf_counter_ns
    count = spent = 0
    with ready.get_lock():
        ready.value += 1
    while True:
        now = phase[0]
        start = clock()
        message = end.get(0.3)
        took = clock() - start
        if message is None:
            if now == STOP:
                break
            continue
        touch(array_of(message))
        del message
        if now == MEASURE:
            count += 1
            spent += took
    stats[2 * slot], stats[2 * slot + 1] = count, spent


def start(errors: Any, fn: Any, *args: Any) -> Any:
    process = CTX.Process(target=_run_child, args=(errors, fn, *args), daemon=True)
    process.start()
    return process


def finish(processes: list, errors: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for process in processes:
        process.join(max(0.1, deadline - time.monotonic()))
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(5)
    if not errors.empty():
        raise RuntimeError(errors.get())
    for process in processes:
        if process.exitcode not in (0, None):
            raise RuntimeError(f"a child exited with code {process.exitcode}")


def wait_ready(ready: Any, n: int, processes: list, errors: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while ready.value < n:
        if not errors.empty():
            raise RuntimeError(errors.get())
        if any(p.exitcode is not None for p in processes):
            time.sleep(0.5)
            raise RuntimeError(errors.get() if not errors.empty() else "a child died")
        if time.monotonic() > deadline:
            raise RuntimeError(f"children not ready within {timeout:.0f} s")
        time.sleep(0.01)


def throughput(peer: Peer, nbytes: int, producers: int, consumers: int, opts: Any) -> dict:
    """Aggregate msgs/s of ``producers`` -> one channel -> ``consumers`` processes."""
    capacity = capacity_for(nbytes)
    handle = peer.open(nbytes, capacity, producers, consumers)
    errors = CTX.Queue()
    phase = RawArray("i", [WARMUP])
    stats = RawArray("q", 2 * (producers + consumers))
    ready = CTX.Value("i", 0)
    processes: list = []
    try:
        for k in range(consumers):
            processes.append(start(errors, _consumer, peer, handle, phase, stats, k, ready))
        for k in range(producers):
            args = (peer, handle, nbytes, phase, stats, consumers + k, ready)
            processes.append(start(errors, _producer, *args))
        wait_ready(ready, producers + consumers, processes, errors)
        time.sleep(opts.warmup_s + min(2.0, nbytes / GiB))
        phase[0] = MEASURE
        began = time.perf_counter()
        time.sleep(opts.window_s)
        phase[0] = STOP
        window = time.perf_counter() - began
        finish(processes, errors, 30 + nbytes / (64 * MiB))
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
        peer.close(handle)
    got = sum(stats[2 * k] for k in range(consumers))
    get_ns = sum(stats[2 * k + 1] for k in range(consumers))
    put = [stats[2 * (consumers + k)] for k in range(producers)]
    put_ns = sum(stats[2 * (consumers + k) + 1] for k in range(producers))
    return {
        "msgs_per_s": got / window,
        "us_per_msg": window * 1e6 / got if got else None,
        "put_us": put_ns / 1e3 / sum(put) if sum(put) else None,
        "get_us": get_ns / 1e3 / got if got else None,
        "received": got,
        "window_s": round(window, 3),
        "capacity": capacity,
    }


def null_floor(nbytes: int, seconds: float) -> float:
    """µs per message of the measuring loop with no transport at all: the phase read, the two
    timer pairs and the touch, in one process."""
    array = np.full(nbytes, 7, np.uint8)
    phase = RawArray("i", [MEASURE])
    clock = time.perf_counter_ns
    n, spent, began = 0, 0, clock()
    deadline = began + int(seconds * 1e9)
    while clock() < deadline:
        for _ in range(1000):
            now = phase[0]
            start = clock()
            message = array
            took = clock() - start
            start = clock()
            touch(message)
            took += clock() - start
            if now == MEASURE:
                n += 1
                spent += took
    return (clock() - began) / 1e3 / n


def put_get_us(nbytes: int, seconds: float) -> dict:
    """The cost of the calls themselves: one process puts a message and gets it back (the ring
    never full or empty, so nothing waits), touching it as the consumers do, less the same
    loop with no transport; also with put_many/get_many of 64."""
    import tensorslab

    tx, rx = tensorslab.channel(capacity=128)
    array = np.full(nbytes, 7, np.uint8)

    def per_message(step: Any, per_step: int) -> float:
        steps, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            for _ in range(100):
                step()
            steps += 100
        return (time.perf_counter() - started) / (steps * per_step) * 1e6

    def single() -> None:
        tx.put(array)
        touch(rx.get())

    batch = [array] * 64

    def batched() -> None:
        tx.put_many(batch)
        for message in rx.get_many(64):
            touch(message)

    def bare() -> None:
        touch(array)

    floor = per_message(bare, 1)
    result = {
        "single": per_message(single, 1) - floor,
        "batched": per_message(batched, 64) - floor,
        "floor": floor,
    }
    tx.close()
    rx.close()
    return result


def timer_pair_us(count: int = 200_000) -> float:
    """µs that a ``start = clock(); ...; clock() - start`` pair adds around a call."""
    clock, spent = time.perf_counter_ns, 0
    for _ in range(count):
        start = clock()
        spent += clock() - start
    return spent / 1e3 / count


# ---------------------------------------------------------------------------------------------
# Latency.


def _lat_consumer(peer: Peer, handle: Any, n: int, out: Any, ready: Any) -> None:
    end = peer.receiver(handle)
    with ready.get_lock():
        ready.value += 1
    for i in range(n):
        message = end.get(30.0)
        now = time.perf_counter_ns()
        if message is None:
            raise RuntimeError(f"latency: message {i} did not arrive within 30 s")
        out[i] = now - int(array_of(message)[:8].view(np.int64)[0])
        del message


def _pipe_consumer(path: str, n: int, out: Any, ready: Any) -> None:
    with ready.get_lock():
        ready.value += 1
    fd = os.open(path, os.O_RDONLY)  # a FIFO: a pipe that a spawned process can open by name
    for i in range(n):
        data = os.read(fd, 8)
        out[i] = time.perf_counter_ns() - int.from_bytes(data, "little")


def _pace(gap_us: float, next_at: int) -> int:
    while time.perf_counter_ns() < next_at:  # busy-wait: the producer's own wake-up is no noise
        pass
    return next_at + int(gap_us * 1e3)


def latency(peer: Peer | None, n: int, gap_us: float) -> dict:
    """One-way µs from the producer's ``perf_counter_ns`` (CLOCK_MONOTONIC) to the consumer's."""
    errors, ready, out = CTX.Queue(), CTX.Value("i", 0), RawArray("q", n)
    if peer is None:
        folder = tempfile.mkdtemp(prefix="tensorslab-bench-")
        path = os.path.join(folder, "wake")
        os.mkfifo(path)
        process = start(errors, _pipe_consumer, path, n, out, ready)
        wait_ready(ready, 1, [process], errors)
        write_fd = os.open(path, os.O_WRONLY)  # returns once the consumer has it open
        send = lambda ts: os.write(write_fd, ts.to_bytes(8, "little"))  # noqa: E731
        handle = None
    else:
        handle = peer.open(64, 8)
        process = start(errors, _lat_consumer, peer, handle, n, out, ready)
        end, array = peer.sender(handle), np.zeros(64, np.uint8)
        stamp = array[:8].view(np.int64)

        def send(ts: int) -> None:
            stamp[0] = ts
            end.put(array, 30.0)

    try:
        wait_ready(ready, 1, [process], errors)
        time.sleep(0.3)
        next_at = time.perf_counter_ns()
        for _ in range(n):
            next_at = _pace(gap_us, next_at)
            send(time.perf_counter_ns())
        finish([process], errors, 30)
    finally:
        if process.is_alive():
            process.kill()
        if peer is None:
            os.close(write_fd)
            os.unlink(path)
            os.rmdir(folder)
        else:
            del end
            peer.close(handle)
    values = sorted(v / 1e3 for v in out[n // 10 :])  # the first tenth is warm-up
    return {
        "p50_us": values[len(values) // 2],
        "p99_us": values[int(len(values) * 0.99)],
        "samples": len(values),
        "gap_us": gap_us,
    }


# ---------------------------------------------------------------------------------------------
# Idle cost.


def _idle(role: str, handle: Any, ready: Any, seconds: float) -> None:
    import tensorslab

    tx, rx = handle
    with ready.get_lock():
        ready.value += 1
    if role == "receiver":
        try:
            rx.get(timeout=seconds)  # nothing is ever sent: blocked in get the whole time
        except tensorslab.Empty:
            pass
    else:
        time.sleep(seconds)  # a sender attached, idle


def cpu_ns(pid: int) -> int:
    """CPU time of a process in ns, every thread of it (its watcher threads included): the
    first field of each /proc/<pid>/task/<tid>/schedstat."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
    return total


def idle_cost(count: int, seconds: float) -> dict:
    """``count`` processes attached to one channel, half blocked in get, half idle senders."""
    import tensorslab

    handle = tensorslab.channel(capacity=8)
    errors, ready = CTX.Queue(), CTX.Value("i", 0)
    roles = ["receiver" if k % 2 == 0 else "sender" for k in range(count)]
    processes = [start(errors, _idle, role, handle, ready, seconds + 600) for role in roles]
    try:
        wait_ready(ready, count, processes, errors, timeout=60 + 3 * count)
        time.sleep(1.0)  # settle: start-up is not idle
        before = [cpu_ns(p.pid) for p in processes]
        began = time.perf_counter()
        time.sleep(seconds)
        after = [cpu_ns(p.pid) for p in processes]
        window = time.perf_counter() - began
    finally:
        for process in processes:
            process.kill()
        for process in processes:
            process.join(5)
        for end in handle:
            end.close()
    share = [100 * (a - b) / 1e9 / window for a, b in zip(after, before)]
    blocked = [s for s, role in zip(share, roles) if role == "receiver"]
    return {
        "processes": count,
        "window_s": round(window, 2),
        "mean_pct": statistics.mean(share),
        "max_pct": max(share),
        "blocked_get_mean_pct": statistics.mean(blocked),
    }


# ---------------------------------------------------------------------------------------------
# Large messages and cold start.


def memcpy_gib_s(nbytes: int, seconds: float) -> float:
    src, dst = np.full(nbytes, 7, np.uint8), np.empty(nbytes, np.uint8)
    np.copyto(dst, src)
    n, began = 0, time.perf_counter()
    while n < 2 or time.perf_counter() - began < seconds:
        np.copyto(dst, src)
        touch(dst)
        n += 1
    return n * nbytes / GiB / (time.perf_counter() - began)


def _cold_consumer(rx: Any, out: Any, ready: Any) -> None:
    with ready.get_lock():
        ready.value += 1
    message = rx.get(timeout=600)
    out[0] = time.perf_counter_ns()
    touch(message)
    del message


def available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * KiB
    return 0


def cold_start(nbytes: int) -> dict:
    """The first message of ``nbytes`` through a new channel against a fresh shared mmap
    written once by one thread; each GiB/s is bytes over time from the write's start."""
    import tensorslab

    need = 2 * nbytes + GiB  # the source and the slab (later the mapping), with headroom
    if available_bytes() < need:
        raise Unsupported(
            f"skipped: {available_bytes() / GiB:.1f} GiB available, {need / GiB:.1f} GiB needed"
        )
    src = np.full(nbytes, 7, np.uint8)
    tx, rx = tensorslab.channel(capacity=1, max_slab_bytes=nbytes + 256 * MiB)
    errors, ready, out = CTX.Queue(), CTX.Value("i", 0), RawArray("q", 1)
    process = start(errors, _cold_consumer, rx, out, ready)
    try:
        wait_ready(ready, 1, [process], errors)
        time.sleep(0.5)  # the consumer is asleep in get
        began = time.perf_counter_ns()
        tx.put(src, timeout=600)
        finish([process], errors, 600)
        channel_s = (out[0] - began) / 1e9
    finally:
        if process.is_alive():
            process.kill()
        tx.close()
        rx.close()
        # close() leaves the slab mapped until the handles are dropped: drop them, or the
        # mapping below is a second copy of the message in memory.
        del tx, rx
    if available_bytes() < nbytes + GiB:
        raise Unsupported(f"mmap baseline skipped: {available_bytes() / GiB:.1f} GiB available")
    flags = mmap.MAP_SHARED | mmap.MAP_ANONYMOUS
    region = mmap.mmap(-1, nbytes, flags=flags)
    began = time.perf_counter_ns()
    np.frombuffer(region, np.uint8)[:] = src
    mmap_s = (time.perf_counter_ns() - began) / 1e9
    region.close()
    del src
    return {
        "bytes": nbytes,
        "channel_s": channel_s,
        "mmap_s": mmap_s,
        "channel_gib_s": nbytes / GiB / channel_s,
        "mmap_gib_s": nbytes / GiB / mmap_s,
    }


# ---------------------------------------------------------------------------------------------
# The run and its table.


def attempt(fn: Any, *args: Any) -> Any:
    """A figure, or the reason there is none (a string)."""
    try:
        return fn(*args)
    except Unsupported as why:
        return f"cannot: {why}"
    except Exception as error:  # noqa: BLE001 - a peer's failure is a row, not a crash
        first = str(error).strip().splitlines()
        return f"failed: {type(error).__name__}: {first[-1] if first else ''}"[:200]


def run(opts: Any) -> dict:
    sizes = [64, KiB, 64 * KiB] if opts.smoke else [64, KiB, 64 * KiB, MiB, 16 * MiB]
    peers = all_peers()
    res: dict = {"smoke": opts.smoke, "cpus": os.cpu_count(), "peers": {}, "one_to_one": {}}
    # Cold start first: it needs the most memory (twice the message), and the machine is
    # most likely to have it before the other cases ran.
    res["cold"] = {}
    for nbytes in [64 * MiB] if opts.smoke else [2 * GiB, 8 * GiB]:
        res["cold"][nbytes] = attempt(cold_start, nbytes)
        log(f"cold {human(nbytes)}: {short(res['cold'][nbytes])}")
    for peer in peers:
        reason = peer.missing()
        res["peers"][peer.name] = {"config": peer.config, "missing": reason}
        res["one_to_one"][peer.name] = {}
        for nbytes in sizes:
            figure = reason or attempt(throughput, peer, nbytes, 1, 1, opts)
            if peer.name == "tensorslab" and isinstance(figure, str):
                raise RuntimeError(f"tensorslab {human(nbytes)}: {figure}")
            res["one_to_one"][peer.name][nbytes] = figure
            log(f"1->1 {peer.name} {human(nbytes)}: {short(figure)}")
    res["floor_us"] = {n: null_floor(n, opts.window_s) for n in sizes}
    res["timer_pair_us"] = timer_pair_us()
    res["put_get_us"] = attempt(put_get_us, 64, 0.5 if opts.smoke else 2.0)
    log(f"put + get in one process: {res['put_get_us']}")

    res["fan_in"] = {}
    counts = [1, 2, 4] if opts.smoke else [1, 2, 4, 8]
    for peer in (Tensorslab(), MpQueuePeer(), FasterFifoPeer()):
        if peer.missing():
            res["fan_in"][peer.name] = peer.missing()
            continue
        rows = res["fan_in"][peer.name] = {}
        for nbytes in (64, 64 * KiB):
            for p, c in [(n, 1) for n in counts] + [(4, 4)]:
                rows[f"{p}x{c} {nbytes}"] = figure = attempt(throughput, peer, nbytes, p, c, opts)
                log(f"fan-in {peer.name} {p}x{c} {human(nbytes)}: {short(figure)}")

    n = 300 if opts.smoke else 3000
    res["latency"] = {
        "spinning": attempt(latency, Tensorslab(spin_us=1000), n, 300.0),
        "asleep": attempt(latency, Tensorslab(), n, 2000.0),
        "pipe": attempt(latency, None, n, 2000.0),
    }
    log(f"latency: {res['latency']}")

    res["idle"] = {}
    for count in [2, 4] if opts.smoke else [2, 16, 64]:
        res["idle"][count] = attempt(idle_cost, count, 0.5 if opts.smoke else 4.0)
        log(f"idle {count}: {short(res['idle'][count])}")

    res["large"] = {}
    for nbytes in [MiB] if opts.smoke else [MiB, 64 * MiB, 256 * MiB]:
        channel = attempt(throughput, Tensorslab(), nbytes, 1, 1, opts)
        res["large"][nbytes] = {"channel": channel, "memcpy_gib_s": memcpy_gib_s(nbytes, 0.5)}
        log(f"large {human(nbytes)}: {short(channel)}")

    return res


def log(line: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {line}", file=sys.stderr, flush=True)


def short(figure: Any) -> str:
    if isinstance(figure, dict) and "msgs_per_s" in figure:
        return f"{figure['msgs_per_s']:,.0f} msgs/s"
    return str(figure)[:160]


def rate(figure: Any) -> float | None:
    return figure["msgs_per_s"] if isinstance(figure, dict) and figure.get("received") else None


def table(res: dict) -> list[tuple[str, str, str, str, str]]:
    rows: list[tuple[str, str, str, str, str]] = []

    def add(case: str, target: str, measured: str, ratio: float | None, met: bool | None) -> None:
        shown = "-" if ratio is None else f"{ratio:.2f}x"
        rows.append((case, target, measured, shown, {True: "yes", False: "NO"}.get(met, "-")))

    one = res["one_to_one"]
    real = [name for name in one if not name.startswith("tensorslab") and name != "mp.Queue"]

    def against_peers(label: str, ours: float, nbytes: int) -> None:
        small = nbytes <= 64 * KiB
        q = rate(one["mp.Queue"].get(nbytes))
        if small and q:
            add(
                f"1->1 {human(nbytes)}{label} vs mp.Queue",
                ">= 10x",
                f"{ours:,.0f} vs {q:,.0f}/s",
                ours / q,
                ours / q >= 10,
            )
        rates = {name: rate(one[name].get(nbytes)) for name in real}
        rates = {k: v for k, v in rates.items() if v}
        need = 1.5 if small else 1.0
        if not rates:
            add(
                f"1->1 {human(nbytes)}{label} vs fastest peer",
                f">= {need}x",
                "no peer measured",
                None,
                None,
            )
            return
        best = max(rates, key=rates.get)
        add(
            f"1->1 {human(nbytes)}{label} vs fastest peer ({best})",
            f">= {need}x",
            f"{ours:,.0f} vs {rates[best]:,.0f}/s",
            ours / rates[best],
            ours / rates[best] >= need,
        )

    for nbytes, ts in one["tensorslab"].items():
        if rate(ts):
            against_peers("", rate(ts), nbytes)
    for nbytes, batched in one.get("tensorslab batched", {}).items():
        if rate(batched) and nbytes <= 64 * KiB:
            against_peers(" batched (8)", rate(batched), nbytes)
    ts64, floor = one["tensorslab"].get(64), res["floor_us"].get(64)
    if rate(ts64):
        above = ts64["us_per_msg"] - floor
        add(
            "64 B time above null floor",
            "<= 1.5 us",
            f"{above:.2f} us/msg (floor {floor:.2f})",
            None,
            above <= 1.5,
        )
    own = res.get("put_get_us")
    if isinstance(own, dict):
        add(
            "64 B put + get, one process (above its floor)",
            "<= 1.5 us",
            f"{own['single']:.2f} us single, {own['batched']:.2f} us batched (64)",
            None,
            own["single"] <= 1.5,
        )
    fan = res["fan_in"].get("tensorslab", {})
    top = max((int(k.split("x")[0]) for k in fan if k.endswith("x1 64")), default=1)
    for nbytes in (64, 64 * KiB):
        one_p, many = rate(fan.get(f"1x1 {nbytes}")), rate(fan.get(f"{top}x1 {nbytes}"))
        if one_p and many and top > 1:
            add(
                f"{top} producers -> 1, {human(nbytes)}",
                ">= 0.7x of 1 producer",
                f"{many:,.0f} vs {one_p:,.0f}/s",
                many / one_p,
                many / one_p >= 0.7,
            )
        four = rate(fan.get(f"4x4 {nbytes}"))
        if four:
            add(
                f"4 producers x 4 consumers, {human(nbytes)}",
                "reported",
                f"{four:,.0f}/s",
                four / one_p if one_p else None,
                None,
            )
    lat = res["latency"]
    spin = lat["spinning"]
    if isinstance(spin, dict):
        add(
            "latency, consumer spinning (spin_us=1000)",
            "p50 <= 5 us, p99 <= 50 us",
            f"p50 {spin['p50_us']:.1f}, p99 {spin['p99_us']:.1f} us",
            None,
            spin["p50_us"] <= 5 and spin["p99_us"] <= 50,
        )
    else:
        add("latency, consumer spinning", "p50 <= 5 us, p99 <= 50 us", spin, None, None)
    asleep, pipe = lat["asleep"], lat["pipe"]
    if isinstance(asleep, dict) and isinstance(pipe, dict):
        ratio = asleep["p50_us"] / pipe["p50_us"]
        add(
            "latency, consumer asleep",
            "p50 <= 1.2x pipe wake",
            f"p50 {asleep['p50_us']:.1f} (p99 {asleep['p99_us']:.0f}) vs pipe "
            f"{pipe['p50_us']:.1f} (p99 {pipe['p99_us']:.0f}) us",
            ratio,
            ratio <= 1.2,
        )
    idle = {k: v for k, v in res["idle"].items() if isinstance(v, dict)}
    if idle:
        worst = max(v["blocked_get_mean_pct"] for v in idle.values())
        counts = sorted(idle)
        grows = idle[counts[-1]]["mean_pct"] / max(idle[counts[0]]["mean_pct"], 1e-3)
        add(
            "idle: a process blocked in get",
            "< 0.5 % of a core",
            f"{worst:.3f} % (worst count)",
            None,
            worst < 0.5,
        )
        shown = ", ".join(f"{k}: {v['mean_pct']:.3f} %" for k, v in sorted(idle.items()))
        add("idle: per-process cost vs processes", "does not grow", shown, grows, grows <= 1.5)
    for nbytes, large in res["large"].items():
        channel = large["channel"]
        if rate(channel):
            gib = channel["msgs_per_s"] * nbytes / GiB
            ratio = gib / large["memcpy_gib_s"]
            add(
                f"large {human(nbytes)} copying put",
                ">= 0.8x memcpy",
                f"{gib:.2f} vs {large['memcpy_gib_s']:.2f} GiB/s",
                ratio,
                ratio >= 0.8,
            )
    for nbytes, cold in res["cold"].items():
        if isinstance(cold, dict):
            ratio = cold["channel_gib_s"] / cold["mmap_gib_s"]
            add(
                f"cold start, first {human(nbytes)}",
                ">= 1.8x fresh mmap",
                f"{cold['channel_gib_s']:.2f} vs {cold['mmap_gib_s']:.2f} GiB/s",
                ratio,
                ratio >= 1.8,
            )
        else:
            add(f"cold start, first {human(nbytes)}", ">= 1.8x fresh mmap", cold, None, None)
    return rows


def details(res: dict) -> list[str]:
    out = ["", "1 producer -> 1 consumer, msgs/s (us/msg above the null floor; put / get us):"]
    floor = res["floor_us"]
    out.append(
        "  null floor (us/msg): " + ", ".join(f"{human(n)} {v:.2f}" for n, v in floor.items())
    )
    for name, sizes in res["one_to_one"].items():
        for nbytes, fig in sizes.items():
            if rate(fig):
                put = f"{fig['put_us']:.2f}" if fig["put_us"] else "-"
                out.append(
                    f"  {name:<22} {human(nbytes):>7}: {fig['msgs_per_s']:>12,.0f}  "
                    f"(+{fig['us_per_msg'] - floor[nbytes]:.2f} us; put {put} / get "
                    f"{fig['get_us']:.2f})"
                )
            else:
                out.append(f"  {name:<22} {human(nbytes):>7}: {fig}")
    out.append("")
    out.append("fan-in / MPMC, aggregate msgs/s (producers x consumers, size):")
    for name, rows in res["fan_in"].items():
        if isinstance(rows, str):
            out.append(f"  {name}: {rows}")
            continue
        for case, fig in rows.items():
            p_c, nbytes = case.split()
            out.append(f"  {name:<14} {p_c:>4} {human(int(nbytes)):>7}: {short(fig)}")
    out.append("")
    out.append("latency (us, one way): " + json.dumps(res["latency"], default=str))
    out.append("idle (% of a core per process): " + json.dumps(res["idle"], default=str))
    out.append("")
    out.append("peers and how each is configured:")
    for name, info in res["peers"].items():
        out.append(f"  {name}: {info['missing'] or info['config']}")
    return out


def iceoryx2_files() -> set[Path]:
    """What iceoryx2 leaves behind: its global management segment in /dev/shm, and the
    folder /tmp/iceoryx2 (its node and service records, which it removes itself)."""
    shm = set(Path("/dev/shm").glob("iox2_*"))
    folders = [Path("/tmp/iceoryx2/nodes"), Path("/tmp/iceoryx2/services"), Path("/tmp/iceoryx2")]
    return shm | {f for f in folders if f.is_dir()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a few seconds, for CI")
    parser.add_argument("--json", type=Path, default=RESULTS)
    opts = parser.parse_args()
    # py-sharedmemory warns when its sender is closed with messages left unread: the run
    # stops its consumers mid-stream on purpose.
    warnings.filterwarnings("ignore", message="Closing the sender discards")
    opts.window_s = 0.2 if opts.smoke else 1.0
    opts.warmup_s = 0.1 if opts.smoke else 0.3
    began = time.perf_counter()
    before = iceoryx2_files()
    try:
        res = run(opts)
    finally:
        for path in sorted(iceoryx2_files() - before, reverse=True):  # files, then folders
            if path.is_dir():
                with contextlib.suppress(OSError):  # not empty: somebody else's
                    path.rmdir()
            else:
                path.unlink(missing_ok=True)
    rows = table(res)
    head = ("case", "target", "measured", "ratio", "met?")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(5)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(head, widths))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    print("\n".join(lines + details(res)))
    print(
        f"\n{'smoke run' if opts.smoke else 'run'} took {time.perf_counter() - began:.0f} s "
        f"on {os.cpu_count()} CPUs"
    )
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    res["table"] = rows
    opts.json.write_text(json.dumps(res, indent=1, default=str))
    print(f"raw figures: {opts.json}")


if __name__ == "__main__":
    main()
