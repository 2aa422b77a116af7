"""Idle cost: CPU a process spends on a channel it is attached to but not using.

N processes attach to one channel; each either blocks in `get` (nothing is ever put) or
just holds its handle (`time.sleep`). After a settling pause the parent reads every
child's on-CPU time (the sum of `/proc/<pid>/task/*/schedstat`, nanoseconds, all its
threads) at the start and end of a window and reports the mean and the largest per-child
share of one core. With `--strace` it also counts one child's syscalls over the window.

    python benches/idle.py --counts 2 16 64 --window 5
    python benches/idle.py --counts 64 --mode hold --strace

Figures are only meaningful on a quiet machine (nothing compiling beside it).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import time

import tensorslab


def child(rx: tensorslab.Receiver, mode: str, ready: object) -> None:
    rx.qsize()  # a fork child registers on its first use of the handle
    ready.release()  # type: ignore[attr-defined]
    if mode == "get":
        try:
            rx.get(timeout=3600)
        except Exception:
            pass
    else:
        time.sleep(3600)


def on_cpu_ns(pid: int) -> int:
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            pass  # a thread that ended in between
    return total


def strace_counts(pid: int, seconds: float) -> tuple[int, dict[str, int]]:
    tracer = subprocess.Popen(
        ["strace", "-f", "-c", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(seconds)
    tracer.send_signal(signal.SIGINT)
    _, report = tracer.communicate(timeout=30)
    calls: dict[str, int] = {}
    for line in report.splitlines():
        # % time  seconds  usecs/call  calls  [errors]  syscall
        match = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$", line)
        if match and match.group(2) != "total":
            calls[match.group(2)] = int(match.group(1))
    return sum(calls.values()), calls


def measure(count: int, mode: str, window: float, settle: float, trace: bool) -> None:
    ctx = mp.get_context("fork")
    tx, rx = tensorslab.channel(capacity=8)
    ready = ctx.Semaphore(0)
    children = [
        ctx.Process(target=child, args=(rx, mode, ready), daemon=True) for _ in range(count)
    ]
    for process in children:
        process.start()
    for _ in children:
        if not ready.acquire(timeout=120):
            raise SystemExit("a child did not attach within 120 s")
    time.sleep(settle)
    pids = [process.pid for process in children]
    before = {pid: on_cpu_ns(pid) for pid in pids}
    start = time.monotonic()
    calls = None
    if trace:
        calls = strace_counts(pids[0], window)
    else:
        time.sleep(window)
    elapsed = time.monotonic() - start
    shares = sorted((on_cpu_ns(pid) - before[pid]) / (elapsed * 1e9) * 100 for pid in pids)
    mean = sum(shares) / len(shares)
    line = (
        f"{count:4d} processes, {mode:4s}: per process {mean:6.3f} % of a core "
        f"(median {shares[len(shares) // 2]:.3f} %, max {shares[-1]:.3f} %)"
    )
    if calls is not None:
        total, by_name = calls
        top = ", ".join(
            f"{name} {n / elapsed:.0f}"
            for name, n in sorted(by_name.items(), key=lambda kv: -kv[1])[:5]
        )
        line += f"; traced child: {total / elapsed:.0f} syscalls/s ({top})"
    print(line, flush=True)
    for process in children:
        process.kill()
    for process in children:
        process.join()
    tx.close()
    rx.close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 16, 64])
    parser.add_argument("--mode", choices=["get", "hold", "both"], default="both")
    parser.add_argument("--window", type=float, default=5.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--strace", action="store_true", help="also count one child's syscalls")
    args = parser.parse_args()
    modes = ["get", "hold"] if args.mode == "both" else [args.mode]
    print(
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, window {args.window} s",
        flush=True,
    )
    for count in args.counts:
        for mode in modes:
            measure(count, mode, args.window, args.settle, args.strace)


if __name__ == "__main__":
    main()
