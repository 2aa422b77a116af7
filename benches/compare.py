#!/usr/bin/env python3
"""tensorslab beside every peer, in one run: throughput, one-way latency, CPU while blocked.

    python benches/compare.py           # full run; JSON and PNG go to benches/results/
    python benches/compare.py --smoke   # seconds, for CI: tiny sizes, one repeat, no plot
    python benches/compare.py --huge    # adds one 8 GiB message (tensorslab and memcpy only)
    python benches/compare.py --sizes 1MiB,batch --transports tensorslab,mp-queue,memcpy

What is measured (see harness.py): one producer and one consumer process (spawn) per transport;
the consumer reads one byte per 4 KiB page of every array it receives (the same touch for every
transport) and times a warm-up and ``--repeats`` windows, keeping the median. memcpy is one
process copying the same arrays into warm, preallocated destinations: the cost of one copy.
No figure here is a pass/fail assertion; --smoke never fails for timing reasons.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import json
import os
import platform
import shlex
import signal
import sys
from pathlib import Path
from typing import Any

import harness
from payloads import (
    DESCRIPTIONS,
    HUGE_CASE,
    REALISTIC_CASES,
    SIZE_CASES,
    GiB,
    case_nbytes,
    check_case,
    format_bytes,
    size_of,
)
from transports import BROADCAST, TENSORSLAB, TRANSPORTS, WAKE_FLOOR, Transport, resolve

RESULTS = Path(__file__).resolve().parent / "results"
LATENCY_TRANSPORTS = ("tensorslab", "mp.Queue", "mp.Pipe")
BLOCKED_TRANSPORTS = ("tensorslab", "mp.Queue")
TOUCH = "the consumer reads 1 byte per 4 KiB page of every received array (numpy strided sum)"
ALLOC_FILL = (
    "tensorslab-alloc: the producer writes only 1 byte per 4 KiB page of each alloc'd buffer "
    "(realistic but cheap; the point of alloc is that nothing is copied)"
)

# Peak memory of a run, in message sizes, for the cases where it matters (>= 256 MiB):
# the source, the messages in flight, and the pickled or received copies.
MEMORY_FACTOR = {
    "memcpy": 2,
    "tensorslab": 3,
    "tensorslab-alloc": 4,
    "mp.Queue": 6,
    "mp.Pipe": 4,
    "shm-per-message": 4,
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="64B and 64KiB, one short repeat, no plot"
    )
    parser.add_argument(
        "--sizes",
        help="comma-separated cases: sizes (64B, 1MiB, 1GiB, ...) and/or "
        + ", ".join(REALISTIC_CASES),
    )
    parser.add_argument(
        "--transports",
        help="comma-separated: "
        + ", ".join(TRANSPORTS)
        + " (aliases mp-queue, mp-pipe, torch-fd, torch-fs, shm)",
    )
    parser.add_argument(
        "--repeats", type=int, help="measured windows per case; the median is kept (default 3)"
    )
    parser.add_argument(
        "--huge", action="store_true", help="add one 8 GiB message (tensorslab and memcpy only)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        help="where to write the results (default benches/results/compare.json; none with --smoke)",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    return parser.parse_args(argv)


def machine() -> dict[str, Any]:
    import numpy

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(_meminfo("MemTotal") / GiB, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
    }
    for module in ("torch", "tensorslab"):
        try:
            info[module] = __import__(module).__version__
        except Exception as error:  # reported, not fatal: the peers still run
            info[module] = f"unavailable ({type(error).__name__}: {error})"
    return info


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def skip_reason(transport: Transport, case: str) -> str | None:
    if case == HUGE_CASE and transport.name not in ("tensorslab", "memcpy"):
        return "8 GiB runs for tensorslab and memcpy only"
    nbytes = case_nbytes(case)
    if nbytes < 256 << 20:
        return None
    need = MEMORY_FACTOR.get(transport.name, 4) * nbytes + GiB
    have = _meminfo("MemAvailable")
    if have < need:
        return f"needs ~{format_bytes(need)} of memory, {format_bytes(have)} available"
    return None


def tensorslab_missing() -> str | None:
    try:
        import tensorslab

        tensorslab.channel  # noqa: B018 (the binding is what is missing when this fails)
    except Exception as error:
        return f"tensorslab not importable: {type(error).__name__}: {error}"
    return None


# ---------------------------------------------------------------------------------------------
# Printing.


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def gib_per_s(result: dict) -> float:
    return result["messages_per_s"] * result["bytes"] / GiB


def row(case: str, transport: str, result: dict) -> str:
    if "messages_per_s" in result:
        return (
            f"{case:<12}{transport:<32}{_fmt(result['messages_per_s']):>12}"
            f"{_fmt(gib_per_s(result)):>10}{_fmt(result['us_per_message']):>12}"
        )
    reason = result.get("skipped") or "failed: " + _last_line(result.get("error", ""))
    return f"{case:<12}{transport:<32}  {reason}"


def print_result(transport: str, case: str, result: dict) -> None:
    print("  " + row(case, transport, result), flush=True)


def print_table(results: dict[str, dict[str, dict]], cases: list[str]) -> None:
    print(f"\n{'case':<12}{'transport':<32}{'msg/s':>12}{'GiB/s':>10}{'µs/msg':>12}")
    for case in cases:
        for transport, by_case in results.items():
            if case in by_case:
                print(row(case, transport, by_case[case]))
        print()


def ratios(
    results: dict[str, dict[str, dict]], cases: list[str]
) -> dict[str, dict[str, dict[str, float]]]:
    """``ratios[ours][peer][case]``: our messages/s over the peer's (> 1: ours is faster)."""
    table: dict[str, dict[str, dict[str, float]]] = {}
    for ours in TENSORSLAB:
        if ours not in results:
            continue
        for peer, by_case in results.items():
            if peer in TENSORSLAB:
                continue
            for case in cases:
                a, b = results[ours].get(case, {}), by_case.get(case, {})
                if "messages_per_s" in a and "messages_per_s" in b:
                    table.setdefault(ours, {}).setdefault(peer, {})[case] = (
                        a["messages_per_s"] / b["messages_per_s"]
                    )
    return table


def print_ratios(table: dict[str, dict[str, dict[str, float]]], cases: list[str]) -> None:
    for ours, by_peer in table.items():
        peers = list(by_peer)
        print(f"\n{ours} throughput ÷ peer throughput (> 1: {ours} is faster)")
        print(f"{'case':<12}" + "".join(f"{_short(p):>14}" for p in peers))
        for case in cases:
            cells = [by_peer[p].get(case) for p in peers]
            if any(c is not None for c in cells):
                print(
                    f"{case:<12}"
                    + "".join(f"{(f'{c:.2f}x' if c is not None else '—'):>14}" for c in cells)
                )


def _short(name: str) -> str:
    return (
        name.replace("torch.mp.Queue[file_descriptor]", "torch[fd]")
        .replace("torch.mp.Queue[file_system]", "torch[fs]")
        .replace("shm-per-message", "shm/msg")
    )


def print_stats(results: dict[str, dict[str, dict]]) -> None:
    for ours in TENSORSLAB:
        for case, result in results.get(ours, {}).items():
            for side in ("sender_stats", "receiver_stats"):
                if result.get(side) is not None:
                    label = "tx.stats()" if side == "sender_stats" else "rx.stats()"
                    print(f"{ours} {case} {label} = {json.dumps(result[side], default=str)}")


def plot(results: dict[str, dict[str, dict]], cases: list[str], path: Path, title: str) -> None:
    """Left: GiB/s against size, one line per transport (log-log). Right: the realistic
    messages as grouped bars. A transport keeps its colour in both."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    def measured(by_case: dict[str, dict], chosen: list[str]) -> list[tuple[int, str, float]]:
        return [
            (i, c, gib_per_s(by_case[c]))
            for i, c in enumerate(chosen)
            if "messages_per_s" in by_case.get(c, {})
        ]

    sizes = [c for c in cases if size_of(c) is not None]
    realistic = [c for c in cases if size_of(c) is None]
    fig, (left, right) = plt.subplots(1, 2, figsize=(15, 6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(results), 1)
    for k, (transport, by_case) in enumerate(results.items()):
        ours = transport in TENSORSLAB
        style = {"color": f"C{k}", "label": transport}
        if points := measured(by_case, sizes):
            xs = [case_nbytes(c) for _, c, _ in points]
            ys = [y for _, _, y in points]
            left.plot(xs, ys, "-s" if ours else "-o", linewidth=2.5 if ours else 1.2, **style)
        if bars := measured(by_case, realistic):
            right.bar([i + k * width for i, _, _ in bars], [y for _, _, y in bars], width, **style)
    plain = FuncFormatter(lambda value, _: f"{value:g}")
    left.set(xscale="log", yscale="log", xlabel="message size", ylabel="GiB/s")
    left.set_xticks([case_nbytes(c) for c in sizes], [format_bytes(case_nbytes(c)) for c in sizes])
    left.xaxis.set_minor_formatter(NullFormatter())
    left.set_title("throughput against message size")
    left.yaxis.set_major_formatter(plain)
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    right.set(yscale="log", ylabel="GiB/s", title="realistic messages")
    right.yaxis.set_major_formatter(plain)
    right.yaxis.set_minor_formatter(plain)
    right.set_xticks([i + 0.4 - width / 2 for i in range(len(realistic))], realistic)
    right.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------


def plan(args: argparse.Namespace) -> tuple[harness.Options, list[str], list[Transport]]:
    if args.smoke:
        opts = harness.Options(repeats=1, target_s=0.02, warmup_s=0.01, max_warmup_s=0.5)
        cases = ["64B", "64KiB"]
    else:
        opts = harness.Options()
        cases = SIZE_CASES + REALISTIC_CASES
    if args.repeats:
        opts = dataclasses.replace(opts, repeats=args.repeats)
    if args.sizes:
        cases = [check_case(c.strip()) for c in args.sizes.split(",") if c.strip()]
    if args.huge and HUGE_CASE not in cases:
        cases.append(HUGE_CASE)
    names = args.transports.split(",") if args.transports else list(TRANSPORTS)
    return opts, cases, [resolve(name.strip()) for name in names]


def run_throughput(
    transports: list[Transport], cases: list[str], opts: harness.Options, missing: str | None
) -> dict[str, dict[str, dict]]:
    results: dict[str, dict[str, dict]] = {}
    for transport in transports:
        print(f"\n{transport.name}: {transport.description}", flush=True)
        by_case: dict[str, dict] = {}
        run = []
        for case in cases:
            reason = missing if transport.name in TENSORSLAB else None
            reason = reason or skip_reason(transport, case)
            if reason:
                by_case[case] = {"skipped": reason}
                print_result(transport.name, case, by_case[case])
            else:
                run.append(case)
        if run:
            printer = functools.partial(print_result, transport.name)
            by_case.update(harness.run_throughput(transport, run, opts, printer))
        results[transport.name] = {c: by_case[c] for c in cases if c in by_case}
    return results


def print_latency(latency: dict[str, dict]) -> None:
    print("\n=== one-way latency, 64 B dict message, consumer blocked in get (paced 200 µs) ===")
    for name, r in latency.items():
        if "p50_us" in r:
            print(
                f"{name:<16} p50 {r['p50_us']:8.1f} µs   p99 {r['p99_us']:8.1f} µs"
                f"   ({r['messages']} messages)"
            )
        else:
            print(f"{name:<16} failed: {_last_line(r.get('error', '?'))}")
    print(f"({WAKE_FLOOR.name}: {WAKE_FLOOR.description}, for scale)")


def print_blocked(blocked: dict[str, dict], seconds: float) -> None:
    print(f"\n=== CPU while blocked in get(timeout={seconds:g}) on an empty channel ===")
    for name, r in blocked.items():
        if "cpu_s" in r:
            print(
                f"{name:<14} {r['percent_of_core']:.3f}% of a core "
                f"({r['cpu_s']:.4f} s CPU in {r['wall_s']:.2f} s; ended with {r['outcome']})"
            )
        else:
            print(f"{name:<16} failed: {_last_line(r.get('error', '?'))}")


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "?"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill` or a CI timeout: unwind, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    command = shlex.join(
        ["python", "benches/compare.py", *(sys.argv[1:] if argv is None else argv)]
    )
    opts, cases, transports = plan(args)
    latency_count, blocked_s = (100, 0.5) if args.smoke else (3000, 5.0)

    info = machine()
    load_at_start = os.getloadavg()[0]  # other work on the machine skews every figure
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(f"touch: {TOUCH}\n{ALLOC_FILL}")
    print(f"{opts.repeats} repeat(s) of >= {opts.target_s} s each, median kept")
    for case in cases:
        if case in DESCRIPTIONS:
            print(f"{case}: {DESCRIPTIONS[case]} ({format_bytes(case_nbytes(case))} of arrays)")
    missing = tensorslab_missing()
    runnable = {t.name for t in transports} - (set(TENSORSLAB) if missing else set())

    results = run_throughput(transports, cases, opts, missing)
    latency = {}
    fan_out = [BROADCAST] if "tensorslab" in runnable else []
    for transport in [TRANSPORTS[n] for n in LATENCY_TRANSPORTS if n in runnable] + [
        *fan_out,
        WAKE_FLOOR,
    ]:
        print(f"\nlatency {transport.name}: {latency_count} paced messages ...", flush=True)
        latency[transport.name] = harness.run_latency(transport, latency_count)
    blocked = {}
    if blocked_on := [TRANSPORTS[n] for n in BLOCKED_TRANSPORTS if n in runnable] + fan_out:
        print(f"\nCPU while blocked in get(timeout={blocked_s:g}) ...", flush=True)
        blocked = harness.run_blocked(blocked_on, blocked_s)

    print(f"\n=== throughput (median of {opts.repeats}) ===")
    print_table(results, cases)
    table = ratios(results, cases)
    print_ratios(table, cases)
    print_latency(latency)
    print_blocked(blocked, blocked_s)
    print(f"\nload average (1 min): {load_at_start:.2f} at start, {os.getloadavg()[0]:.2f} at end")
    print("\n=== tensorslab stats ===")
    print_stats(results)

    report = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "load_average_1min": {"start": load_at_start, "end": os.getloadavg()[0]},
        "options": dataclasses.asdict(opts),
        "touch": TOUCH,
        "alloc_fill": ALLOC_FILL,
        "transports": {t.name: t.description for t in [*transports, WAKE_FLOOR]},
        "cases": {
            c: {
                "bytes": case_nbytes(c),
                "description": DESCRIPTIONS.get(c, "uint8 array in a dict"),
            }
            for c in cases
        },
        "results": results,
        "ratios": table,
        "latency": latency,
        "blocked_cpu": blocked,
    }
    text = json.dumps(report, indent=1, default=str)  # also checks, under --smoke, that it can
    json_path = args.json or (None if args.smoke else RESULTS / "compare.json")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
        print(f"\nwrote {json_path}")
        if not (args.smoke or args.no_plot):
            png = json_path.with_suffix(".png")
            title = f"{command}\n{info['cpu']}, {info['cores']} cores, Linux {info['kernel']}"
            plot(results, cases, png, title)
            print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
