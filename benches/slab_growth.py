"""Slab memory over a long run: after N messages of mixed sizes, the slab should map no
more than about the peak of bytes in flight (no growth, no fragmentation creep).

One producer process puts N messages (sizes log-uniform from 64 B to 1 MiB, a few 16 MiB);
the consumer keeps a random number of them alive (up to 32) to vary what is in flight, and
records the peak of slab_used_bytes. Prints mapped bytes against that peak.

    python benches/slab_growth.py --messages 1000000
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import random
import time

import numpy as np

import tensorslab


def producer(tx, count: int, seed: int) -> None:
    rng = random.Random(seed)
    block = np.ones(16 << 20, np.uint8)
    for _ in range(count):
        nbytes = 16 << 20 if rng.random() < 0.001 else int(2 ** rng.uniform(6, 20))
        tx.put(block[:nbytes], timeout=60)
    tx.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    tx, rx = tensorslab.channel(capacity=64)
    child = mp.get_context("spawn").Process(target=producer, args=(tx, args.messages, args.seed))
    child.start()
    tx.close()
    held: list = []
    peak_used = received = 0
    checkpoints = {}
    started = time.perf_counter()
    for msg in rx:
        held.append(msg)
        received += 1
        if len(held) > rng.randint(0, 32):
            del held[: rng.randint(1, len(held))]
        if received % 1000 == 0:
            stats = rx.stats()
            peak_used = max(peak_used, stats["slab_used_bytes"])
            if received in (1000, 10_000, 100_000, args.messages):
                checkpoints[received] = stats["slab_mapped_bytes"]
    child.join()
    held.clear()
    stats = rx.stats()
    seconds = time.perf_counter() - started
    print(f"messages {received:,} in {seconds:.0f} s ({received / seconds:,.0f}/s)")
    print(f"peak slab_used_bytes (sampled every 1000 messages): {peak_used / 2**20:.1f} MiB")
    for count, mapped in sorted(checkpoints.items()):
        print(f"slab_mapped_bytes after {count:>9,} messages: {mapped / 2**20:.1f} MiB")
    print(f"segments: {stats['segments']}; used at the end: {stats['slab_used_bytes']} bytes")
    print(f"mapped / peak in flight: {stats['slab_mapped_bytes'] / max(peak_used, 1):.2f}")


if __name__ == "__main__":
    main()
