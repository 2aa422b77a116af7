"""Runs transports in real processes and measures them; never hangs.

Throughput: one producer and one consumer process (``spawn``) per transport go through every
case in turn. The consumer times itself: a warm-up (at least ``capacity + 2`` messages, so a
channel that grows has grown, and at least ``warmup_s``), then ``repeats`` windows of at least
``target_s`` each; the figure kept is the median window. The producer sends until the consumer
raises the case's stop flag, then sends ``None``; the consumer drains up to it. The queue depth
(``capacity_for``) is the same for every transport, so nothing buffers more than the others.

Every child runs under :class:`Children`: each wait has a timeout, a child's exception comes
back as a report with its traceback, a child that dies is noticed within a second, and leaving
the ``with`` block joins, terminates or kills whatever still runs.
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import resource
import statistics
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
from payloads import (
    GiB,
    MiB,
    arrays,
    build_payload,
    case_nbytes,
    empty_like_aligned,
    touch,
)
from transports import Transport

CTX = mp.get_context("spawn")
STARTUP_S = 90.0  # spawn + importing torch, on a loaded 2-core machine
STOP, DRAINED = 1, 2  # a case's stop flag: the consumer stops the producer, then lets it go


@dataclass(frozen=True)
class Options:
    repeats: int = 3
    target_s: float = 0.5  # each measured window lasts at least this long
    warmup_s: float = 0.2
    max_warmup_s: float = 2.0  # at huge sizes one slow message is warm-up enough


def capacity_for(nbytes: int) -> int:
    """Queue depth for a message size: 8, fewer when 8 would pin more than 256 MiB."""
    if nbytes > 4 * GiB:
        return 1
    return max(2, min(8, (256 * MiB) // max(nbytes, 1)))


def message_timeout(nbytes: int) -> float:
    """How long one put/get may wait: generous (the slowest peer moves ~0.1 GiB/s)."""
    return 30.0 + nbytes / (32 * MiB)


def measure(step: Callable[[], None], opts: Options, min_warmup: int) -> dict:
    start, count = time.perf_counter(), 0
    while True:
        step()
        count += 1
        elapsed = time.perf_counter() - start
        if (count >= min_warmup and elapsed >= opts.warmup_s) or elapsed >= opts.max_warmup_s:
            break
    windows = []
    for _ in range(opts.repeats):
        start, n = time.perf_counter(), 0
        while True:
            step()
            n += 1
            elapsed = time.perf_counter() - start
            if (n >= 2 and elapsed >= opts.target_s) or elapsed >= 3 * opts.target_s:
                break
        windows.append((n, elapsed))
    seconds = statistics.median(elapsed / n for n, elapsed in windows)
    return {
        "messages_per_s": 1.0 / seconds,
        "us_per_message": seconds * 1e6,
        "warmup_messages": count,
        "windows": [{"messages": n, "seconds": round(s, 6)} for n, s in windows],
    }


# ---------------------------------------------------------------------------------------------
# Children and their supervision.


def _child(target: Callable[..., None], report: Any, role: str, args: tuple) -> None:
    try:
        target(report, *args)
    except BaseException:
        report.put(("error", role, traceback.format_exc()))
        report.close()
        report.join_thread()
        raise SystemExit(1) from None
    report.put(("exit", role, None))
    report.close()
    report.join_thread()


class ChildError(RuntimeError):
    pass


class Children:
    """Child processes reporting ``(kind, role, value)`` tuples to the parent through one queue."""

    def __init__(self) -> None:
        self.report = CTX.Queue()
        self.processes: dict[str, Any] = {}
        self.exited: set[str] = set()

    def start(self, role: str, target: Callable[..., None], *args: Any) -> None:
        process = CTX.Process(
            target=_child, args=(target, self.report, role, args), name=f"bench-{role}", daemon=True
        )
        process.start()
        self.processes[role] = process

    def reports(self, idle_timeout: Callable[[], float]) -> Iterator[tuple[str, str, Any]]:
        """Reports until every child has exited; raises :class:`ChildError` on a child's error,
        death or silence longer than ``idle_timeout()`` seconds."""
        deadline = time.monotonic() + idle_timeout()
        while len(self.exited) < len(self.processes):
            try:
                kind, role, value = self.report.get(timeout=1.0)
            except queue.Empty:
                for role, process in self.processes.items():
                    if role not in self.exited and process.exitcode is not None:
                        time.sleep(0.5)  # its last report may still be in the pipe
                        if self.report.empty():
                            code = process.exitcode
                            raise ChildError(f"{role} process died with exit code {code}") from None
                if time.monotonic() > deadline:
                    silent = f"no report for {idle_timeout():.0f} s"
                    raise ChildError(f"{silent}; stopping the run") from None
                continue
            if kind == "error":
                raise ChildError(f"{role} process failed:\n{value}")
            if kind == "exit":
                self.exited.add(role)
                continue
            deadline = time.monotonic() + idle_timeout()
            yield kind, role, value

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc: Any) -> None:
        deadline = time.monotonic() + (2.0 if exc[0] else 20.0)
        for process in self.processes.values():
            while process.is_alive() and time.monotonic() < deadline:
                self._drain()
                process.join(0.1)
        for process in self.processes.values():
            if process.is_alive():
                process.terminate()
                process.join(3.0)
            if process.is_alive():
                process.kill()
                process.join(3.0)
        self._drain()
        self.report.close()
        self.report.cancel_join_thread()

    def _drain(self) -> None:
        # A child cannot exit while its last reports sit unread in a full pipe.
        try:
            while True:
                self.report.get_nowait()
        except (queue.Empty, OSError, ValueError):
            pass


# ---------------------------------------------------------------------------------------------
# Throughput.


def _producer(report: Any, transport: Transport, ends: list, cases: list[str], stop: Any) -> None:
    transport.init_process()
    for k, (case, end) in enumerate(zip(cases, ends)):
        payload = build_payload(case, transport.form_for(case))
        timeout = message_timeout(case_nbytes(case))
        step = 0
        while not stop[k]:
            msg = transport.make_message(end, step, payload)
            transport.send(end, msg, timeout)
            del msg
            step += 1
        transport.send(end, None, timeout)
        report.put(("sent", "producer", (k, step, transport.sender_stats(end))))
        # Stay until the consumer has drained: torch's file_descriptor strategy fetches each
        # tensor's fd from the sending process when it unpickles it.
        deadline = time.monotonic() + timeout + 60
        while stop[k] != DRAINED:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{transport.name}: the consumer did not finish draining")
            time.sleep(0.001)
        transport.close_send(end)
        del payload


def _consumer(
    report: Any, transport: Transport, ends: list, cases: list[str], stop: Any, opts: Options
) -> None:
    transport.init_process()
    for k, (case, end) in enumerate(zip(cases, ends)):
        nbytes = case_nbytes(case)
        timeout = message_timeout(nbytes)

        def step(timeout: float = timeout, end: Any = end) -> None:
            msg, token = transport.recv(end, timeout)
            if msg is None:
                raise RuntimeError(
                    f"{transport.name}: end of stream before the consumer stopped it"
                )
            touch(msg["data"])
            del msg
            transport.release(token)

        step(timeout + STARTUP_S)  # the producer may still be importing or building the payload
        result = measure(step, opts, min_warmup=capacity_for(nbytes) + 1)
        stop[k] = STOP
        drained = 0
        while True:
            msg, token = transport.recv(end, timeout)
            if msg is None:
                break
            del msg
            transport.release(token)
            drained += 1
        result.update(bytes=nbytes, drained=drained, receiver_stats=transport.receiver_stats(end))
        stop[k] = DRAINED
        transport.close_recv(end)
        report.put(("result", "consumer", (k, result)))


def _memcpy(report: Any, cases: list[str], opts: Options) -> None:
    for k, case in enumerate(cases):
        sources = arrays(build_payload(case, "numpy"))
        destinations = [empty_like_aligned(source) for source in sources]

        def step(sources: list = sources, destinations: list = destinations) -> None:
            for destination, source in zip(destinations, sources):
                np.copyto(destination, source)
            touch(destinations)

        result = measure(step, opts, min_warmup=2)
        result.update(bytes=case_nbytes(case))
        report.put(("result", "memcpy", (k, result)))
        del sources, destinations


def run_throughput(
    transport: Transport, cases: list[str], opts: Options, on_result: Callable[[str, dict], None]
) -> dict[str, dict]:
    """Measures ``transport`` on every case; a failed case is recorded and the rest run in a
    fresh pair of processes."""
    results: dict[str, dict] = {}
    pending = list(cases)
    while pending:
        done = _run_pair(transport, pending, opts, results, on_result)
        if done < len(pending):
            failed = pending[done]
            results.setdefault(failed, {"error": "the consumer exited without a result"})
            on_result(failed, results[failed])
            pending = pending[done + 1 :]
        else:
            pending = []
    return results


def _run_pair(
    transport: Transport,
    cases: list[str],
    opts: Options,
    results: dict[str, dict],
    on_result: Callable[[str, dict], None],
) -> int:
    """Runs ``cases`` in one pair of processes; returns how many completed."""
    stop = CTX.RawArray("b", len(cases))
    sent: dict[int, tuple[int, Any]] = {}
    done = 0

    def idle_timeout() -> float:
        nbytes = case_nbytes(cases[min(done, len(cases) - 1)])
        per_case = opts.max_warmup_s + opts.repeats * 3 * opts.target_s
        return STARTUP_S + per_case + 12 * message_timeout(nbytes)

    ends: list[tuple[Any, Any]] = []
    try:
        with Children() as children:
            if transport.local:
                children.start("memcpy", _memcpy, cases, opts)
            else:
                ends = [
                    transport.open(CTX, capacity_for(case_nbytes(c)), case_nbytes(c)) for c in cases
                ]
                children.start("producer", _producer, transport, [e[0] for e in ends], cases, stop)
                children.start(
                    "consumer", _consumer, transport, [e[1] for e in ends], cases, stop, opts
                )
                for send_end, recv_end in ends:
                    transport.close_parent(send_end, recv_end)
            for kind, _, value in children.reports(idle_timeout):
                if kind == "sent":  # may come before or after the consumer's result
                    k, count, stats = value
                    sent[k] = (count, stats)
                    if cases[k] in results:
                        results[cases[k]].update(sent=count, sender_stats=stats)
                elif kind == "result":
                    k, result = value
                    if k in sent:
                        result.update(sent=sent[k][0], sender_stats=sent[k][1])
                    results[cases[k]] = result
                    done = k + 1
                    on_result(cases[k], result)
    except ChildError as error:
        if done < len(cases):
            results[cases[done]] = {"error": str(error)}
        else:  # every case measured; a failure while shutting down is still worth showing
            results[cases[-1]]["error_after_measuring"] = str(error)
    finally:
        for k in range(len(stop)):
            stop[k] = DRAINED
    return done


# ---------------------------------------------------------------------------------------------
# Latency and CPU while blocked.


def _latency_producer(
    report: Any, transport: Transport, end: Any, count: int, pace_s: float, ready: Any
) -> None:
    transport.init_process()
    data = np.zeros(64, np.uint8)
    if not ready.wait(STARTUP_S):
        raise TimeoutError("the latency consumer did not start")
    time.sleep(0.05)  # let it reach its blocking get
    for step in range(count):
        time.sleep(pace_s)
        transport.send(end, {"step": step, "t": time.perf_counter_ns(), "data": data}, 30.0)
    transport.send(end, None, 30.0)
    transport.close_send(end)


def _latency_consumer(report: Any, transport: Transport, end: Any, ready: Any) -> None:
    transport.init_process()
    delays = []
    timeout = 30.0
    ready.set()
    while True:
        msg, token = transport.recv(end, timeout)
        # perf_counter_ns is CLOCK_MONOTONIC: one clock for every process on the machine.
        now = time.perf_counter_ns()
        if msg is None:
            break
        delays.append(now - msg["t"])
        del msg
        transport.release(token)
        timeout = 30.0
    transport.close_recv(end)
    kept = np.array(delays[len(delays) // 10 :], dtype=np.float64) / 1e3  # first 10%: warm-up
    report.put(
        (
            "latency",
            "consumer",
            {
                "messages": int(kept.size),
                "p50_us": float(np.percentile(kept, 50)),
                "p99_us": float(np.percentile(kept, 99)),
                "max_us": float(kept.max()),
            },
        )
    )


def run_latency(transport: Transport, count: int, pace_s: float = 200e-6) -> dict:
    """One-way latency of a 64 B dict message to a consumer blocked in its get."""
    send_end, recv_end = transport.open(CTX, 8)
    ready = CTX.Event()
    result: dict = {}
    try:
        with Children() as children:
            children.start("producer", _latency_producer, transport, send_end, count, pace_s, ready)
            children.start("consumer", _latency_consumer, transport, recv_end, ready)
            transport.close_parent(send_end, recv_end)
            for _, _, value in children.reports(lambda: STARTUP_S + count * 0.01 + 60):
                result = value
    except ChildError as error:
        result = {"error": str(error)}
    return result


def _blocked(report: Any, transport: Transport, end: Any, seconds: float) -> None:
    transport.init_process()
    try:  # the first get pays one-time costs (lazy imports, first wait set-up): not blocking
        transport.recv(end, 0.05)
    except Exception:
        pass
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    try:
        transport.recv(end, seconds)
        outcome = "a message arrived (unexpected)"
    except Exception as error:  # the timeout is the expected outcome
        outcome = type(error).__name__
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    report.put(
        (
            "blocked",
            transport.name,
            {"cpu_s": cpu, "wall_s": wall, "percent_of_core": 100 * cpu / wall, "outcome": outcome},
        )
    )


def run_blocked(transports: list[Transport], seconds: float) -> dict[str, dict]:
    """CPU a consumer burns in ``get(timeout=seconds)`` on an empty channel, all transports at
    once (each process counts only its own CPU). The parent holds the senders open."""
    ends = {t.name: t.open(CTX, 8) for t in transports}
    results: dict[str, dict] = {}
    try:
        with Children() as children:
            for t in transports:
                children.start(t.name, _blocked, t, ends[t.name][1], seconds)
            for _, role, value in children.reports(lambda: STARTUP_S + seconds + 30):
                results[role] = value
    except ChildError as error:
        for t in transports:
            results.setdefault(t.name, {"error": str(error)})
    finally:
        for t in transports:
            t.close_parent(*ends[t.name])
    return results
