"""Soak test (``make soak``; not part of ``make test``): producers and consumers are killed
with SIGKILL and restarted at random for a while, then everything is checked.

Each message carries (producer generation, seq) and a checksum. Consumers log every message
they take to a file before taking the next, so after the run the parent knows what was
delivered. It reports messages moved, processes killed, memory reclaimed from the dead, and
what is wrong: corrupt or duplicated messages, per-producer order broken, memory that never
came back, segments left behind. It exits non-zero if anything is wrong.

    python tests/soak.py --seconds 600
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import time
from collections import defaultdict

import numpy as np

import tensorslab
from tensorslab.testing import leaked_segments


def producer(tx, generation: int, seed: int) -> None:
    rng = random.Random(seed)
    seq = 0
    while True:
        nbytes = rng.choice([64, 4096, 65536, 1 << 20, 8 << 20])
        if rng.random() < 0.5:
            # Built in place in the slab (`alloc`), as DataLoader workers and actors do; the
            # producer drops its view at once, so only the message holds the buffer.
            payload = tx.alloc((nbytes,), np.uint8, timeout=60)
            payload[:] = (generation + seq) % 251
        else:
            payload = np.full(nbytes, (generation + seq) % 251, np.uint8)
        checksum = int(payload.sum(dtype=np.int64))
        message = {"generation": generation, "seq": seq, "sum": checksum, "payload": payload}
        tx.put(message, timeout=60)
        del message, payload
        seq += 1


def consumer(rx, log_path: str, producers_gone) -> None:
    with open(log_path, "a", buffering=1) as log:
        held = None
        while True:
            try:
                msg = rx.get(timeout=2)
            except tensorslab.Closed:
                return
            except tensorslab.Empty:
                # A producer killed before it unpickled its handle leaves a pending ticket
                # that keeps the channel open while this parent lives (see the README), so
                # the drain ends on "producers gone and nothing left" rather than Closed.
                if producers_gone.is_set():
                    return
                continue
            intact = int(msg["payload"].sum(dtype=np.int64)) == msg["sum"]
            log.write(f"{msg['generation']} {msg['seq']} {int(intact)}\n")
            held = msg  # hold one message's views while taking the next
        del held


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--producers", type=int, default=3)
    parser.add_argument("--consumers", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--start-method", default="spawn", choices=["spawn", "fork", "forkserver"])
    args = parser.parse_args()
    rng = random.Random(args.seed)
    ctx = mp.get_context(args.start_method)
    logs = tempfile.mkdtemp(prefix="tensorslab-soak-logs-")
    producers_gone = ctx.Event()
    tx, rx = tensorslab.channel(capacity=32, max_slab_bytes=256 << 20)
    generation = 0
    producers: dict[int, mp.Process] = {}
    consumers: dict[str, mp.Process] = {}

    def start_producer() -> None:
        nonlocal generation
        generation += 1
        process = ctx.Process(target=producer, args=(tx, generation, rng.random()), daemon=True)
        process.start()
        producers[generation] = process

    def start_consumer() -> None:
        path = os.path.join(logs, f"consumer-{len(os.listdir(logs))}-{time.monotonic_ns()}.log")
        open(path, "w").close()
        process = ctx.Process(target=consumer, args=(rx, path, producers_gone), daemon=True)
        process.start()
        consumers[path] = process

    for _ in range(args.producers):
        start_producer()
    for _ in range(args.consumers):
        start_consumer()
    killed = {"producers": 0, "consumers": 0}
    peak_used = 0
    started = time.monotonic()
    print(
        f"soak: {args.seconds:.0f} s, {args.producers} producers, {args.consumers} consumers, "
        f"{args.start_method}; logs in {logs}",
        flush=True,
    )
    while time.monotonic() - started < args.seconds:
        time.sleep(rng.uniform(0.05, 0.5))
        peak_used = max(peak_used, tx.stats()["slab_used_bytes"])
        if rng.random() < 0.5:
            key = rng.choice(list(producers))
            os.kill(producers.pop(key).pid, signal.SIGKILL)
            killed["producers"] += 1
            start_producer()
        else:
            key = rng.choice(list(consumers))
            os.kill(consumers[key].pid, signal.SIGKILL)
            consumers[key].join(10)
            killed["consumers"] += 1
            del consumers[key]
            start_consumer()
    # Stop producers cleanly-by-death, let consumers drain, then close.
    for process in producers.values():
        os.kill(process.pid, signal.SIGKILL)
        process.join(10)
    tx.close()
    producers_gone.set()
    for process in consumers.values():
        process.join(120)
    stuck = [p.pid for p in consumers.values() if p.is_alive()]
    for pid in stuck:
        os.kill(pid, signal.SIGKILL)
    # What was delivered, from every consumer's log.
    delivered = []
    for name in os.listdir(logs):
        with open(os.path.join(logs, name)) as file:
            for line in file:
                parts = line.split()
                if len(parts) == 3:
                    delivered.append((int(parts[0]), int(parts[1]), parts[2] == "1"))
    ids = [(g, s) for g, s, _ in delivered]
    corrupt = sum(1 for *_, ok in delivered if not ok)
    duplicates = len(ids) - len(set(ids))
    by_generation = defaultdict(list)
    for g, s in ids:
        by_generation[g].append(s)
    # Each producer's messages are delivered in order with at most a few gaps (messages a
    # killed consumer held or was taking); count seqs that went backwards.
    order_breaks = 0
    for name in os.listdir(logs):
        last = {}
        with open(os.path.join(logs, name)) as file:
            for line in file:
                g, s, _ = (int(x) for x in line.split())
                order_breaks += s < last.get(g, -1)
                last[g] = s
    # Messages published but never logged: held or being taken by a consumer when it was
    # killed (at most two per kill). Gaps below a generation's highest delivered seq.
    lost = sum(max(seqs) + 1 - len(set(seqs)) for seqs in by_generation.values())
    deadline = time.monotonic() + 30
    while rx.stats()["slab_used_bytes"] and time.monotonic() < deadline:
        time.sleep(0.1)
    still_used = rx.stats()["slab_used_bytes"]
    mapped = rx.stats()["slab_mapped_bytes"]
    rx.close()
    tx = rx = None  # drop this process's handles before looking for leaks
    gc.collect()
    leaks = leaked_segments()
    report = {
        "seconds": round(time.monotonic() - started, 1),
        "messages_delivered": len(ids),
        "producers_killed": killed["producers"],
        "consumers_killed": killed["consumers"],
        "peak_slab_used_bytes": peak_used,
        "slab_mapped_bytes": mapped,
        "slab_used_bytes_at_end": still_used,
        "corrupt": corrupt,
        "duplicates": duplicates,
        "order_breaks": order_breaks,
        "lost_with_killed_consumers": lost,
        "consumers_stuck": len(stuck),
        "leaked_segments": leaks,
    }
    print(json.dumps(report, indent=1))
    too_many_lost = lost > 2 * killed["consumers"]
    bad = corrupt or duplicates or order_breaks or still_used or stuck or leaks or too_many_lost
    print("soak:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
