#!/usr/bin/env python3
"""Process-pool executors side by side in one run: the standard library's, npshmex's, ours.

    python benches/executor.py            # full run: a markdown table of times and ratios
    python benches/executor.py --smoke    # seconds, for CI: tiny sizes, one repetition

Cases, each through ``concurrent.futures.ProcessPoolExecutor``,
``npshmex.ProcessPoolExecutor`` and ``tensorslab.ProcessPoolExecutor`` with the same start
method:

- ``npshmex README``: npshmex's own example, ``add_one`` on ``np.ones(int(2e7))`` (153 MiB of
  float64) with one worker, ``submit`` then ``result()``: the array goes to the worker and
  ``x + 1`` comes back.
- ``map, 1,000 small arrays``: ``list(ex.map(add_one, arrays))`` over 1,000 arrays of 128
  float64 (1 KiB), two workers, ``chunksize=1``.
- ``map, 64 arrays of 8 MiB``: ``ex.map(add_one, arrays)`` over 64 float64 arrays of 8 MiB,
  two workers, each result checked and dropped as it arrives (as a consumer of ``map``
  does).

Each executor is started and warmed up (its workers started, one repetition of the case run
and thrown away) before the timed repetitions; the median repetition is kept. Every result
is checked. npshmex moves only arrays that are direct arguments of ``submit`` through shared
memory: ``map`` hands its arguments to ``submit`` inside a chunk (a tuple), which it pickles,
as the standard library does. npshmex is a benchmark-only peer: ``pip install npshmex``;
without it its column says so and the others run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing as mp
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from compare import machine

import tensorslab

MiB = 1 << 20
NPSHMEX_MISSING = "npshmex is not installed: `pip install npshmex` to measure it"


def add_one(x: np.ndarray) -> np.ndarray:
    return x + 1


@dataclass(frozen=True)
class Plan:
    big: int = int(2e7)  # npshmex README: np.ones(int(2e7))
    small_count: int = 1000
    small_items: int = 128  # 1 KiB of float64
    large_count: int = 64
    large_bytes: int = 8 * MiB
    repeats: int = 5


SMOKE = Plan(big=int(2e5), small_count=50, large_count=4, large_bytes=256 * 1024, repeats=1)


@dataclass(frozen=True)
class Case:
    name: str
    workers: int
    run: Callable[[Any], None]  # one repetition through an executor


def cases(plan: Plan) -> list[Case]:
    big = np.ones(plan.big)
    smalls = [np.full(plan.small_items, float(i)) for i in range(plan.small_count)]
    larges = [np.full(plan.large_bytes // 8, float(i)) for i in range(plan.large_count)]

    def readme(executor) -> None:
        future = executor.submit(add_one, big)
        result = future.result(timeout=600)
        assert result.shape == big.shape and result[0] == 2.0 and result[-1] == 2.0

    def map_small(executor) -> None:
        results = list(executor.map(add_one, smalls, timeout=600))
        assert len(results) == len(smalls)
        assert all(r[0] == i + 1.0 for i, r in enumerate(results))

    def map_large(executor) -> None:
        count = 0
        for i, result in enumerate(executor.map(add_one, larges, timeout=600)):
            assert result[0] == i + 1.0 and result[-1] == i + 1.0
            count += 1
        assert count == len(larges)

    big_mib = big.nbytes / MiB
    return [
        Case(f"npshmex README: add_one(np.ones({plan.big:.0e})) {big_mib:.0f} MiB", 1, readme),
        Case(f"map, {plan.small_count:,} small arrays ({plan.small_items * 8} B)", 2, map_small),
        Case(f"map, {plan.large_count} arrays of {plan.large_bytes / MiB:g} MiB", 2, map_large),
    ]


def executors() -> dict[str, Callable[..., Any] | str]:
    """Each contender's class, or why it cannot run."""
    found: dict[str, Callable[..., Any] | str] = {
        "stdlib": concurrent.futures.ProcessPoolExecutor,
    }
    try:
        import npshmex
    except ImportError:
        found["npshmex"] = NPSHMEX_MISSING
    else:
        found["npshmex"] = npshmex.ProcessPoolExecutor
    found["tensorslab"] = tensorslab.ProcessPoolExecutor
    return found


def measure(make: Callable[..., Any], case: Case, context, repeats: int) -> float:
    """Median seconds of one repetition, after a warm-up repetition."""
    with make(max_workers=case.workers, mp_context=context) as executor:
        list(executor.map(abs, range(case.workers * 4)))  # every worker started
        case.run(executor)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            case.run(executor)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def ratio(numerator: float | str, denominator: float | str) -> str:
    if isinstance(numerator, str) or isinstance(denominator, str):
        return "-"
    return f"{numerator / denominator:.2f}×"


def milliseconds(value: float | str) -> str:
    return value if isinstance(value, str) else f"{value * 1e3:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repetition")
    parser.add_argument("--start-method", default="fork", choices=mp.get_all_start_methods())
    parser.add_argument("--repeats", type=int, help="timed repetitions per case (default 5)")
    args = parser.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    if args.repeats:
        plan = Plan(**{**plan.__dict__, "repeats": args.repeats})
    context = mp.get_context(args.start_method)
    contenders = executors()

    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    info = machine()
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"start method {args.start_method}, median of {plan.repeats} after a warm-up\n")
    if isinstance(contenders["npshmex"], str):
        print(contenders["npshmex"] + "\n")

    print("| case | workers | stdlib ms | npshmex ms | tensorslab ms | vs stdlib | vs npshmex |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    for case in cases(plan):
        times: dict[str, float | str] = {}
        for name, make in contenders.items():
            times[name] = (
                make if isinstance(make, str) else measure(make, case, context, plan.repeats)
            )
        ours = times["tensorslab"]
        print(
            f"| {case.name} | {case.workers} | {milliseconds(times['stdlib'])} | "
            f"{milliseconds(times['npshmex']) if not isinstance(times['npshmex'], str) else '-'} | "
            f"{milliseconds(ours)} | {ratio(times['stdlib'], ours)} | "
            f"{ratio(times['npshmex'], ours)} |",
            flush=True,
        )
        verdicts.append((case, times))

    print("\nratios: the peer's time divided by tensorslab's (> 1: tensorslab is faster)")
    print("targets: >= 4x the standard library on the large cases and faster than npshmex;")
    print("         not slower than the standard library on the small one")
    for case, times in verdicts:
        small = case.run.__name__ == "map_small"
        speedup = times["stdlib"] / times["tensorslab"]
        met = speedup >= (1.0 if small else 4.0)
        if not small and not isinstance(times["npshmex"], str):
            met = met and times["npshmex"] > times["tensorslab"]
        print(f"  {case.name}: {'met' if met else 'NOT met'}")
    if args.smoke:
        print("(--smoke sizes: these verdicts mean nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
