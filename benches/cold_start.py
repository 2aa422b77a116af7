"""Cold start: the first large message through a NEW channel, slab growth included.

For each size, in one run: a fresh shared mapping (``mmap``, ``MAP_SHARED``) written once by
one thread from the same source array (the reference: what a new segment per message costs);
then a new channel whose consumer (another process, already waiting in ``get``) takes the
message and touches one byte per page, for the first and the second message. A message's
time runs from just before ``put`` until the consumer has touched its last page
(``time.perf_counter`` is ``CLOCK_MONOTONIC``, the same clock in every process).

The first put is then broken into its parts, timed with the same system calls from Python on
a memfd of the same size: reserving (``fallocate``), populating (``MAP_POPULATE``, or
``MADV_POPULATE_WRITE`` over disjoint ranges in threads) and the copy into populated pages.

    python benches/cold_start.py --sizes 2 8        # GiB; needs 2x the largest + 1 GiB free

``cold_start(nbytes)`` is the case other benchmarks call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import mmap
import multiprocessing as mp
import os
import resource
import threading
import time

import numpy as np

import tensorslab

GiB = 1 << 30
PAGE = 4096
MADV_POPULATE_WRITE = 23
CTX = mp.get_context("spawn")


def _consumer(rx, done) -> None:
    rx.get(timeout=600)  # the warm-up message
    done.put(time.perf_counter())
    for _ in range(2):
        array = rx.get(timeout=600)
        # One byte per page: the pages must be mapped here, not only in the producer.
        int(array[::PAGE].sum())
        done.put(time.perf_counter())
        del array


def cpu_seconds() -> float:
    """CPU time of this process, every thread included (the populating ones too)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def fresh_mmap_seconds(source: np.ndarray) -> tuple[float, float]:
    """A new shared mapping written once by one thread, as a new segment per message costs:
    (wall, CPU) seconds."""
    started, cpu = time.perf_counter(), cpu_seconds()
    region = mmap.mmap(-1, source.nbytes, flags=mmap.MAP_SHARED)
    np.frombuffer(region, np.uint8)[:] = source
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    region.close()
    return seconds, cpu


def cold_start(nbytes: int, source: np.ndarray | None = None) -> dict:
    """Seconds for the first and the second message of `nbytes` through a new channel (put
    until the consumer has touched every page), and the fresh-mmap reference, same run; the
    CPU seconds of the reference and of each put (this process, every thread), which a
    loaded machine changes less than the wall-clock ones."""
    if source is None:
        source = np.ones(nbytes, np.uint8)
    # Before and after the channel, the faster kept: the reference is not handicapped by
    # coming first (or last) on a machine whose free pages cost more the first time.
    reference = fresh_mmap_seconds(source)
    tx, rx = tensorslab.channel(capacity=2, max_slab_bytes=nbytes + (nbytes >> 3))
    done = CTX.Queue()
    consumer = CTX.Process(target=_consumer, args=(rx, done))
    consumer.start()
    rx.close()
    # The consumer is up and waiting in `get` before the clock starts.
    tx.put(np.zeros(1, np.uint8))
    done.get(timeout=120)
    figures = {}
    try:
        for name in ("first", "second"):
            started, cpu = time.perf_counter(), cpu_seconds()
            tx.put(source, timeout=600)
            figures[f"{name}_put_s"] = time.perf_counter() - started
            figures[f"{name}_put_cpu_s"] = cpu_seconds() - cpu
            figures[f"{name}_s"] = done.get(timeout=600) - started
    finally:
        consumer.join(60)
        tx.close()
    # Every handle gone, so the slab is unmapped before the second reference maps as much.
    del tx, rx
    gc.collect()
    figures["reference_s"], figures["reference_cpu_s"] = min(reference, fresh_mmap_seconds(source))
    return figures


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t] + [ctypes.c_int] * 3 + [ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.memmove.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]


def parts(source: np.ndarray, threads: int) -> dict:
    """The parts of a growth by `source.nbytes` with the given populating (0 threads:
    fallocate + MAP_POPULATE, the old path; n: MADV_POPULATE_WRITE in n threads)."""
    nbytes = source.nbytes
    fd = os.memfd_create("tensorslab-bench")
    try:
        os.ftruncate(fd, nbytes)
        started, cpu = time.perf_counter(), cpu_seconds()
        if threads == 0:
            os.posix_fallocate(fd, 0, nbytes)
        reserved = time.perf_counter()
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if threads == 0 else 0)
        address = _libc.mmap(None, nbytes, mmap.PROT_READ | mmap.PROT_WRITE, flags, fd, 0)
        if threads:
            step = nbytes // threads // PAGE * PAGE

            def populate(index: int) -> None:
                end = nbytes if index == threads - 1 else (index + 1) * step
                start = index * step
                if _libc.madvise(address + start, end - start, MADV_POPULATE_WRITE) != 0:
                    raise OSError(ctypes.get_errno(), "MADV_POPULATE_WRITE")

            workers = [threading.Thread(target=populate, args=(i,)) for i in range(threads)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        populated, populate_cpu = time.perf_counter(), cpu_seconds() - cpu
        _libc.memmove(address, source.ctypes.data, nbytes)
        copied = time.perf_counter()
        _libc.munmap(address, nbytes)
    finally:
        os.close(fd)
    return {
        "reserve_s": reserved - started,
        "populate_s": populated - reserved,
        "copy_s": copied - populated,
        "reserve+populate cpu_s": populate_cpu,
    }


def available_bytes() -> int:
    with open("/proc/meminfo") as file:
        for line in file:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[2, 8], help="GiB")
    parser.add_argument("--no-parts", action="store_true", help="skip the break-down")
    args = parser.parse_args()
    print(f"{'size':>8} {'case':<34} {'seconds':>8} {'GiB/s':>7} {'x fresh mmap':>13} {'cpu s':>6}")
    for gib in args.sizes:
        nbytes = int(gib * GiB) // PAGE * PAGE
        # The source and one mapping of its size at a time (the slab, or the reference).
        if available_bytes() < 2 * nbytes + GiB:
            print(f"{gib:>6g} G skipped: {available_bytes() / GiB:.1f} GiB available")
            continue
        source = np.ones(nbytes, np.uint8)
        figures = cold_start(nbytes, source)
        reference = figures["reference_s"]
        rows = [
            ("fresh shared mmap, one thread", reference, figures["reference_cpu_s"]),
            ("tensorslab first: put", figures["first_put_s"], figures["first_put_cpu_s"]),
            ("tensorslab first: put + get/touch", figures["first_s"], None),
            ("tensorslab second: put", figures["second_put_s"], figures["second_put_cpu_s"]),
            ("tensorslab second: put + get/touch", figures["second_s"], None),
        ]
        for case, seconds, cpu in rows:
            rate, ratio = nbytes / GiB / seconds, reference / seconds
            cpu_text = "" if cpu is None else f"{cpu:>6.2f}"
            print(f"{gib:>6g} G {case:<34} {seconds:>8.2f} {rate:>7.2f} {ratio:>12.2f}x {cpu_text}")
        if not args.no_parts:
            for threads, label in ((0, "fallocate + MAP_POPULATE"), (2, "POPULATE_WRITE x2")):
                got = parts(source, threads)
                text = ", ".join(f"{key[:-2]} {value:.2f}" for key, value in got.items())
                print(f"{gib:>6g} G   parts, {label}: {text}")
        del source


if __name__ == "__main__":
    main()
