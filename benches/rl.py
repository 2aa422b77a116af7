#!/usr/bin/env python3
"""RL traffic, tensorslab beside its peers in one run: weight broadcast and rollout streaming.

    python benches/rl.py            # full run: markdown tables, benches/results/rl.json
    python benches/rl.py --smoke    # seconds, for CI: a tiny model, 1 round, no JSON

Weight broadcast: the learner (this process) holds a stack of Linear layers (~100 MB of
float32 in ~300 tensors by default). Each round it writes a new version into its module (every
parameter filled with the round's number: the same update for every contender) and hands it
to 1, 2 and 4 actor processes (spawn), each of which loads it into its own module, checks its
first and last element and acknowledges through its own pipe (the same side channel for every
contender). A round runs from the start of the update to the last acknowledgement: the
update is inside because the shared-parameters pattern does it in place under its lock. The
median of ``--rounds`` rounds after a warm-up round is kept. Shared memory: the peak while
the rounds ran (the system's ``Shmem`` sampled every 2 ms, over its value before them, plus
what the contender's set-up added), the segments the learner and its actors map or hold after
each round (each counted once), and for tensorslab the slab's own figures.

Rollout streaming: actor processes step a fake env (a few ready-made large observations,
nothing computed) into rollouts of ``T`` steps of ``N`` envs and send them; the learner (this
process) touches one byte per 4 KiB page of every array it receives and drops it. Env steps per
second, median of ``--repeats`` windows (harness.measure). The queue depth is the same for all.

Every process runs torch on one thread (two cores, up to five processes).
No figure is asserted; the targets of issue 11 are printed with whether they were met.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing.connection
import os
import shlex
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import rl_peers
from compare import machine
from dataloader import shared_segments
from harness import CTX, STARTUP_S, ChildError, Children, Options, measure
from payloads import GiB, format_bytes, touch

RESULTS = Path(__file__).resolve().parent / "results"
ROLLOUT_DEPTH = 4  # rollouts queued and not yet taken, for every contender


@dataclasses.dataclass(frozen=True)
class Plan:
    width: int = 208  # 75 blocks of 208 -> 832 -> 208: 300 tensors, 104 MB
    blocks: int = 75
    counts: tuple[int, ...] = (1, 2, 4)
    rounds: int = 7
    warmup: int = 1
    rollout_actors: int = 2
    steps: int = 64
    envs: int = 16
    obs_dtype: str = "uint8"
    timeout_s: float = 120.0
    measure: Options = Options(repeats=3, target_s=1.0, warmup_s=0.5, max_warmup_s=5.0)


SMOKE = Plan(
    width=16,
    blocks=4,
    counts=(1, 2),
    rounds=1,
    warmup=0,
    rollout_actors=1,
    steps=4,
    envs=2,
    timeout_s=60.0,
    measure=Options(repeats=1, target_s=0.02, warmup_s=0.01, max_warmup_s=0.5),
)


# ---------------------------------------------------------------------------------------------
# Shared memory.


def system_shmem() -> int:
    """``Shmem`` of /proc/meminfo: every tmpfs and memfd page in the system."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class ShmemPeak:
    """The highest ``system_shmem()`` while the block runs, sampled in a thread (one small
    file read per sample; reading every process's maps that often would steal a core)."""

    def __init__(self, interval: float = 0.002) -> None:
        self.interval = interval
        self.start = self.peak = system_shmem()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, system_shmem())

    def __enter__(self) -> ShmemPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, system_shmem())


def held_segments(pids: list[int]) -> int:
    """Bytes of the shared-memory segments these processes map or hold, each counted once."""
    segments: dict[int, int] = {}
    for pid in pids:
        segments.update(shared_segments(pid))
    return sum(segments.values())


# ---------------------------------------------------------------------------------------------
# Weight broadcast.


def _failure(children: Children, what: str) -> ChildError:
    """A ChildError for ``what``, with the traceback of any actor that reported one."""
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        try:
            kind, role, value = children.report.get(timeout=0.1)
        except Exception:
            continue
        if kind == "error":
            return ChildError(f"{what}; {role} failed:\n{value}")
    return ChildError(what)


def _collect(children: Children, conns: dict[int, Any], kind: str, phase: Any, timeout: float):
    """Waits for message ``(kind, phase, value)`` from every actor in ``conns``; returns the
    values. An actor that dies or stays silent past ``timeout`` is a ChildError."""
    pending, values = dict(conns), {}
    sentinels = {children.processes[f"actor{i}"].sentinel: i for i in pending}
    deadline = time.monotonic() + timeout
    while pending:
        left = deadline - time.monotonic()
        ready = multiprocessing.connection.wait([*pending.values(), *sentinels], max(left, 0))
        if not ready:
            silent = f"no {kind!r} from actors {sorted(pending)} in {timeout:.0f} s"
            raise _failure(children, silent)
        for obj in ready:
            i = sentinels.get(obj)
            if i is None:
                i = next(k for k, conn in pending.items() if conn is obj)
                try:
                    got = obj.recv()
                except EOFError:
                    got = None
                if got is None or got[:2] != (kind, phase):
                    raise _failure(children, f"actor{i} sent {got!r}, expected {kind!r}")
                values[i] = got[2]
                del pending[i]
            elif i in pending:
                raise _failure(children, f"actor{i} exited with code {_exit_code(children, i)}")
    return values


def _exit_code(children: Children, actor: int) -> Any:
    process = children.processes[f"actor{actor}"]
    process.join(1.0)
    return process.exitcode


def run_weights(peer: rl_peers.WeightPeer, plan: Plan) -> dict[str, dict]:
    """Every phase (actor count) of one contender, with one set of actor processes."""
    model = rl_peers.build_model(plan.width, plan.blocks)
    nbytes = rl_peers.model_nbytes(plan.width, plan.blocks)
    results: dict[str, dict] = {}
    before_open = system_shmem()
    peer.open(CTX, list(plan.counts), model)
    rounds = plan.warmup + plan.rounds
    try:
        with Children() as children:
            conns = {}
            for i in range(max(plan.counts)):
                mine, theirs = CTX.Pipe()
                args = (peer.actor_end(i), theirs, plan.width, plan.blocks, rounds, plan.timeout_s)
                children.start(f"actor{i}", rl_peers.weight_actor, *args)
                theirs.close()
                conns[i] = mine
            peer.close_parent_copies()
            opened = max(system_shmem() - before_open, 0)  # what the contender holds up front
            _collect(children, conns, "ready", None, STARTUP_S * max(plan.counts))
            pids = [os.getpid(), *(p.pid for p in children.processes.values())]
            value = 0.0
            for phase, count in enumerate(plan.counts):
                actors = {i: conns[i] for i in range(count)}
                for conn in actors.values():
                    conn.send(("go", phase))
                _collect(children, actors, "ready", phase, plan.timeout_s)
                times, sends, updates, held, slab = [], [], [], [], []
                with ShmemPeak() as shmem:
                    for r in range(rounds):
                        value += 1.0
                        start = time.perf_counter()
                        peer.update(model, value)
                        updated = time.perf_counter()
                        peer.send(phase, model, plan.timeout_s)
                        sent = time.perf_counter()
                        loaded = _collect(children, actors, "loaded", phase, plan.timeout_s)
                        done = time.perf_counter()
                        if set(loaded.values()) != {value}:
                            raise ChildError(f"round {r}: actors loaded {loaded}, not {value}")
                        held.append(held_segments(pids))
                        slab.append(peer.stats(phase))
                        if r >= plan.warmup:
                            times.append(done - start)
                            updates.append(updated - start)
                            sends.append(sent - updated)
                peer.end_phase(phase)
                peak = opened + max(shmem.peak - shmem.start, 0)
                results[str(count)] = {
                    "actors": count,
                    "round_s": statistics.median(times),
                    "rounds_s": [round(t, 6) for t in times],
                    "update_s": statistics.median(updates),
                    "send_s": statistics.median(sends),
                    "shm_peak_bytes": peak,
                    "shm_held_bytes": max(held),
                    "weights_bytes": nbytes,
                    "shm_peak_copies": peak / nbytes,
                    "slab": _max_figures(slab),
                }
                print(f"  {peer.name:<26} {count} actor(s): {_round_line(results[str(count)])}")
            for conn in conns.values():
                conn.send(("exit",))
            for _ in children.reports(lambda: plan.timeout_s):
                pass
    except ChildError as error:
        results["error"] = {"error": str(error)}
        print(f"  {peer.name}: failed: {error}", flush=True)
    finally:
        peer.close()
    return results


def _max_figures(figures: list[dict | None]) -> dict | None:
    present = [f for f in figures if f]
    return {key: max(f[key] for f in present) for key in present[0]} if present else None


def _round_line(result: dict) -> str:
    return (
        f"{result['round_s'] * 1e3:8.1f} ms a round (update {result['update_s'] * 1e3:.1f} ms,"
        f" send {result['send_s'] * 1e3:.1f} ms); shared memory peak "
        f"{format_bytes(result['shm_peak_bytes'])} ({result['shm_peak_copies']:.2f} copies)"
    )


# ---------------------------------------------------------------------------------------------
# Rollout streaming.


def run_rollout(peer: rl_peers.RolloutPeer, plan: Plan) -> dict:
    spec = rl_peers.rollout_spec(plan.steps, plan.envs, (4, 84, 84), plan.obs_dtype)
    env_steps = plan.steps * plan.envs
    stop = CTX.RawValue("b", 0)
    peer.open(CTX, ROLLOUT_DEPTH)
    result: dict = {}
    try:
        with Children() as children:
            for i in range(plan.rollout_actors):
                args = (peer.sender(), i, spec, stop, plan.timeout_s)
                children.start(f"actor{i}", rl_peers.rollout_actor, *args)
            peer.close_parent_copies()

            def step(timeout: float = plan.timeout_s) -> None:
                msg = peer.recv(timeout)
                if msg is None:
                    raise ChildError("an actor ended its stream before the learner stopped it")
                touch(msg["rollout"])
                del msg

            try:
                step(STARTUP_S * plan.rollout_actors)
                result = measure(step, plan.measure, min_warmup=ROLLOUT_DEPTH + 1)
            except Exception as error:
                if isinstance(error, ChildError):
                    raise
                raise _failure(children, f"{type(error).__name__}: {error}") from None
            result["env_steps_per_s"] = result["messages_per_s"] * env_steps
            result["stats"] = peer.stats() if hasattr(peer, "stats") else None
            stop.value = rl_peers.STOP
            ended = 0
            while ended < plan.rollout_actors:
                ended += peer.recv(plan.timeout_s) is None
            stop.value = rl_peers.DRAINED
            for _ in children.reports(lambda: plan.timeout_s):
                pass
    except ChildError as error:
        result = {"error": str(error)}
    finally:
        stop.value = rl_peers.DRAINED
        peer.close()
    if "env_steps_per_s" in result:
        print(f"  {peer.name:<26} {result['env_steps_per_s']:>12,.0f} env steps/s")
    else:
        print(f"  {peer.name}: failed: {result.get('error')}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------
# Tables and targets.


def _ratio(numerator: float | None, denominator: float | None) -> str:
    return f"{numerator / denominator:.2f}×" if numerator and denominator else "—"


def weights_table(weights: dict[str, dict], counts: tuple[int, ...]) -> str:
    """Markdown: one row per contender and actor count; ratios are the peer's round time over
    this row's (> 1: this row is faster)."""
    peers = (rl_peers.TorchQueuePerActor.name, rl_peers.SharedUnderLock.name)
    lines = [
        "| contender | actors | round (ms) | learner: update + send (ms) | vs torch.mp.Queue "
        "| vs shared params + lock | peak shared memory (copies) | held after a round "
        "| slab mapped / used |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, by_count in weights.items():
        if "error" in by_count:
            lines.append(f"| {name} | — | failed: {_last_line(by_count['error']['error'])} |")
        for count in counts:
            r = by_count.get(str(count))
            if r is None:
                continue
            ratios = [
                _ratio(weights.get(p, {}).get(str(count), {}).get("round_s"), r["round_s"])
                for p in peers
            ]
            slab = r["slab"]
            slab_cell = "—"
            if slab:
                mapped, used = slab["slab_mapped_bytes"], slab["slab_used_bytes"]
                slab_cell = f"{format_bytes(mapped)} / {format_bytes(used)}"
            lines.append(
                f"| {name} | {count} | {r['round_s'] * 1e3:.1f} | "
                f"{r['update_s'] * 1e3:.1f} + {r['send_s'] * 1e3:.1f} | {' | '.join(ratios)} | "
                f"{format_bytes(r['shm_peak_bytes'])} ({r['shm_peak_copies']:.2f}) | "
                f"{format_bytes(r['shm_held_bytes'])} | {slab_cell} |"
            )
    return "\n".join(lines)


def rollout_table(rollout: dict[str, dict], rollout_bytes: int) -> str:
    def rate(name: str) -> float | None:
        return rollout.get(name, {}).get("env_steps_per_s")

    torch_q, mp_q = rate(rl_peers.TorchQueueRollouts.name), rate(rl_peers.QueueRollouts.name)
    lines = [
        "| contender | env steps/s | rollouts/s | GiB/s | vs torch.mp.Queue | vs mp.Queue |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rollout.items():
        if "env_steps_per_s" not in r:
            lines.append(f"| {name} | failed: {_last_line(r.get('error', '?'))} |")
            continue
        steps, per_s = r["env_steps_per_s"], r["messages_per_s"]
        lines.append(
            f"| {name} | {steps:,.0f} | {per_s:.1f} | {per_s * rollout_bytes / GiB:.2f} | "
            f"{_ratio(steps, torch_q)} | {_ratio(steps, mp_q)} |"
        )
    return "\n".join(lines)


def targets(weights: dict[str, dict], rollout: dict[str, dict], counts: tuple[int, ...]) -> list:
    """Issue 11's targets: ``(target, figure, met)``; ``met`` is None when not measured."""
    most = str(max(counts))
    found = []

    def round_s(peer: type) -> float | None:
        return weights.get(peer.name, {}).get(most, {}).get("round_s")

    torch_q, shared = round_s(rl_peers.TorchQueuePerActor), round_s(rl_peers.SharedUnderLock)
    for ours in (rl_peers.Latest, rl_peers.Broadcast):
        mine = round_s(ours)
        for peer_s, factor, label in (
            (torch_q, 5.0, "torch.mp.Queue per actor"),
            (shared, 1.0, "shared params + lock"),
        ):
            target = f"{ours.name} to {most} actors >= {factor:g}x {label}"
            if mine and peer_s:
                found.append((target, f"{peer_s / mine:.2f}x", peer_s / mine >= factor))
            else:
                found.append((target, "not measured", None))
        rows = [r for k, r in weights.get(ours.name, {}).items() if k != "error"]
        target = f"{ours.name}: shared memory for the weights <= 2 copies at every actor count"
        if rows:
            worst = max(r["shm_peak_copies"] for r in rows)
            each = ", ".join(f"{r['shm_peak_copies']:.3f} to {r['actors']}" for r in rows)
            figure = f"at most {worst:.3f} copies ({each})"
            found.append((target, figure, worst <= 2.0))
        else:
            found.append((target, "not measured", None))
    chunks = rollout.get(rl_peers.Chunks.name, {}).get("env_steps_per_s")
    torch_r = rollout.get(rl_peers.TorchQueueRollouts.name, {}).get("env_steps_per_s")
    target = "rollout streaming with tensorslab chunks >= 3x torch.mp.Queue"
    if chunks and torch_r:
        found.append((target, f"{chunks / torch_r:.2f}x", chunks / torch_r >= 3.0))
    else:
        found.append((target, "not measured", None))
    return found


def _last_line(text: str) -> str:
    return text.strip().splitlines()[-1] if text.strip() else "?"


def shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


# ---------------------------------------------------------------------------------------------


def run_each(peers: list[type], run: Any, plan: Plan) -> dict[str, dict]:
    results = {}
    for peer_class in peers:
        peer = peer_class()
        print(f"{peer.name}: {peer.description}", flush=True)
        results[peer.name] = run(peer, plan)
    return results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 round, no JSON")
    parser.add_argument("--rounds", type=int, help="measured weight rounds (default 7)")
    parser.add_argument("--repeats", type=int, help="rollout windows, median kept (default 3)")
    parser.add_argument("--actors", help="comma-separated actor counts (default 1,2,4)")
    parser.add_argument("--obs-dtype", choices=("uint8", "float32"), help="observation dtype")
    parser.add_argument("--json", type=Path, help="default benches/results/rl.json (not --smoke)")
    parser.add_argument("--only", choices=("weights", "rollout"), help="run one benchmark")
    return parser.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    plan = SMOKE if args.smoke else Plan()
    if args.rounds:
        plan = dataclasses.replace(plan, rounds=args.rounds)
    if args.repeats:
        options = dataclasses.replace(plan.measure, repeats=args.repeats)
        plan = dataclasses.replace(plan, measure=options)
    if args.actors:
        plan = dataclasses.replace(plan, counts=tuple(int(c) for c in args.actors.split(",")))
    if args.obs_dtype:
        plan = dataclasses.replace(plan, obs_dtype=args.obs_dtype)
    return plan


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # `kill` or a CI timeout: unwind, so every child process is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    import torch

    torch.set_num_threads(1)  # as the actors: two cores, several processes
    command = shlex.join(["python", "benches/rl.py", *(sys.argv[1:] if argv is None else argv)])
    plan = make_plan(args)
    info = machine()
    load_at_start = os.getloadavg()[0]
    files_at_start = shm_files()
    nbytes = rl_peers.model_nbytes(plan.width, plan.blocks)
    spec = rl_peers.rollout_spec(plan.steps, plan.envs, (4, 84, 84), plan.obs_dtype)
    print(f"command: {command}")
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    print(
        f"torch threads per process: 1; start method spawn; sharing strategy "
        f"{torch.multiprocessing.get_sharing_strategy()}"
    )

    weights: dict[str, dict] = {}
    if args.only in (None, "weights"):
        layers = 2 * plan.blocks
        print(
            f"\n=== weight broadcast: {layers} Linear layers ({2 * layers} tensors, "
            f"{format_bytes(nbytes)} float32), {plan.rounds} round(s) after {plan.warmup} "
            f"warm-up, median ==="
        )
        weights = run_each(rl_peers.WEIGHT_PEERS, run_weights, plan)
    rollout: dict[str, dict] = {}
    if args.only in (None, "rollout"):
        print(
            f"\n=== rollout streaming: {plan.rollout_actors} actor(s) x {plan.envs} envs x "
            f"{plan.steps} steps, obs {plan.obs_dtype}[4,84,84], "
            f"{format_bytes(rl_peers.rollout_nbytes(spec))} a rollout, depth {ROLLOUT_DEPTH} ==="
        )
        rollout = run_each(rl_peers.ROLLOUT_PEERS, run_rollout, plan)

    load_at_end = os.getloadavg()[0]
    found = targets(weights, rollout, plan.counts)
    print(f"\nload average (1 min): {load_at_start:.2f} at start, {load_at_end:.2f} at end")
    if weights:
        print(
            f"\n### Weight broadcast ({format_bytes(nbytes)}, time until every actor loaded "
            "the new version)\n"
        )
        print(weights_table(weights, plan.counts))
    if rollout:
        print("\n### Rollout streaming\n")
        print(rollout_table(rollout, rl_peers.rollout_nbytes(spec)))
    print("\n### Targets (issue 11; reported, not asserted)\n")
    if args.smoke:
        print("(--smoke sizes: a 33 KiB model and tiny rollouts; these verdicts mean nothing)")
    for target, figure, met in found:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[met]
        print(f"- {target}: {figure}, {verdict}")
    left = sorted(f for f in shm_files() - files_at_start if "torch" in f or "tensorslab" in f)
    if left:
        print(f"\nleft in /dev/shm: {left}")

    report = {
        "command": command,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info,
        "load_average_1min": {"start": load_at_start, "end": load_at_end},
        "plan": dataclasses.asdict(plan),
        "weights_bytes": nbytes,
        "rollout_bytes": rl_peers.rollout_nbytes(spec),
        "contenders": {
            p.name: p.description for p in [*rl_peers.WEIGHT_PEERS, *rl_peers.ROLLOUT_PEERS]
        },
        "weights": weights,
        "rollout": rollout,
        "targets": [{"target": t, "figure": f, "met": m} for t, f, m in found],
        "left_in_dev_shm": left,
    }
    text = json.dumps(report, indent=1, default=str)  # also checks, under --smoke, that it can
    json_path = args.json or (None if args.smoke else RESULTS / "rl.json")
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text + "\n")
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
