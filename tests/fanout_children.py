"""What the broadcast and mailbox tests run in child processes (see `fanout_helpers.Child`).

This module imports neither torch nor the suite's `children` (which imports torch through
`samples`): a spawn child that needs only NumPy starts in a fraction of a second instead of
seconds, which keeps test_broadcast.py and test_latest.py within their time budget. The
functions that need torch import it themselves. Every blocking call has a timeout.
"""

from __future__ import annotations

import pickle
import resource
import time
import zlib

import numpy as np

import tensorslab
from child_runner import run_and_report  # noqa: F401  (re-exported: the entry point)

TIMEOUT = 60


# --- broadcast messages ---------------------------------------------------------------------


def message(seq: int, nbytes: int = 16 << 10) -> dict:
    """Message `seq`: arrays of a size and content that depend on it."""
    rng = np.random.default_rng(seq)
    return {
        "seq": seq,
        "nbytes": nbytes,
        "a": rng.standard_normal(nbytes // 8 + seq % 7).astype(np.float64),
        "b": rng.integers(-(2**15), 2**15, size=(3, 5 + seq % 3), dtype=np.int16),
        "tag": f"message {seq}",
    }


def digest(msg: dict) -> tuple:
    """What identifies a message and its content: seq and checksums of every leaf."""
    return (
        msg["seq"],
        zlib.crc32(np.ascontiguousarray(msg["a"]).tobytes()),
        msg["a"].dtype.str,
        msg["a"].shape,
        zlib.crc32(np.ascontiguousarray(msg["b"]).tobytes()),
        msg["b"].shape,
        msg["tag"],
    )


def intact(msg: dict) -> bool:
    return digest(msg) == digest(message(msg["seq"], msg["nbytes"]))


def read_until_closed(sub, go=None, use_iter=False, started=None) -> list:
    """Digests of every message until every publisher closed (`iter(sub)` if `use_iter`).

    `started`: set once the subscriber was used here (so it counts in this process), for
    tests that are about something else than handing a subscriber over.
    """
    if started is not None:
        sub.qsize()
        started.set()
    if go is not None:
        assert go.wait(TIMEOUT), "never told to start"
    got = []
    if use_iter:
        # No timeout here: the test's child deadline bounds it.
        for msg in sub:
            got.append(digest(msg))
            del msg
        return got
    while True:
        try:
            msg = sub.get(timeout=TIMEOUT)
        except tensorslab.Closed as error:
            # The end of the stream, unless the subscriber itself is gone: say so.
            assert "subscriber" not in str(error), f"after {len(got)} messages: {error}"
            return got
        got.append(digest(msg))
        del msg


def load_pickled_subscriber(data: bytes, go) -> list:
    """Loads a subscriber pickled (and closed) by the parent, then reads until Closed."""
    assert go.wait(TIMEOUT), "never told to start"
    sub = pickle.loads(data)
    return read_until_closed(sub)


def subscriber_agent(sub, commands, replies) -> None:
    """Does what the parent says, one command at a time, and replies to each:

    ("read", n): take n messages, drop them, reply their seqs; ("hold", n): the same, but
    keep the views; ("missed",): reply `sub.missed`; ("drain",): read until Closed, reply
    the seqs; ("close",): close the subscriber; ("stop",): return.
    """
    sub.qsize()  # Used here first, so it counts here before the parent drops its own.
    replies.put("started")
    held = []
    while True:
        command = commands.get(timeout=TIMEOUT)
        if command[0] == "stop":
            return
        if command[0] in ("read", "hold"):
            seqs = []
            for _ in range(command[1]):
                msg = sub.get(timeout=TIMEOUT)
                assert intact(msg), f"message {msg['seq']} corrupt"
                seqs.append(msg["seq"])
                if command[0] == "hold":
                    held.append(msg)
                del msg
            replies.put(seqs)
        elif command[0] == "missed":
            replies.put(sub.missed)
        elif command[0] == "drain":
            replies.put([seq for seq, *_ in read_until_closed(sub)])
        elif command[0] == "close":
            sub.close()
            replies.put("closed")
        else:
            raise ValueError(f"unknown command {command!r}")


def check_read_only(sub) -> list:
    """Takes two messages: the first as shared views (must be read-only), the second with
    `copy=True` (writable, private); returns what was wrong."""
    problems = []
    shared = sub.get(timeout=TIMEOUT)
    for name in ("a", "b"):
        array = shared[name]
        if array.flags.writeable:
            problems.append(f"shared {name} is writable")
        try:
            array[0] = 0
            problems.append(f"writing into shared {name} did not raise")
        except ValueError:
            pass
    if not intact(shared):
        problems.append("shared message corrupt")
    private = sub.get(timeout=TIMEOUT, copy=True)
    for name in ("a", "b"):
        if not private[name].flags.writeable:
            problems.append(f"copied {name} is read-only")
        private[name][...] = 0
    return problems


def torch_views(first, second) -> dict:
    """Two subscribers of one channel in this process read the same two messages: the
    first as views (both must see the same memory), the second with `copy=True`."""
    import torch

    a, b = first.get(timeout=TIMEOUT), second.get(timeout=TIMEOUT)
    c, d = first.get(timeout=TIMEOUT, copy=True), second.get(timeout=TIMEOUT)
    return {
        "types": [type(x["t"]).__name__ for x in (a, b, c, d)],
        "same_view": a["t"].data_ptr() == b["t"].data_ptr(),
        "values": [bool(torch.equal(x["t"], torch.arange(1000.0) + x["seq"])) for x in (a, c)],
        "copy_is_private": c["t"].data_ptr() != d["t"].data_ptr(),
    }


def cpu_while_blocked(sub, seconds: float) -> dict:
    """CPU time this process uses in one `get(timeout=seconds)` on an empty subscriber."""
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    try:
        sub.get(timeout=seconds)
        outcome = "a message"
    except tensorslab.Empty:
        outcome = "Empty"
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.monotonic() - started
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"cpu": cpu, "wall": wall, "outcome": outcome}


def publish_then_close(pub, first: int, count: int, go=None) -> None:
    if go is not None:
        assert go.wait(TIMEOUT), "never told to start"
    for seq in range(first, first + count):
        pub.put(message(seq), timeout=TIMEOUT)
    pub.close()


def close_handle(handle) -> None:
    handle.close()


def wait_forever(handle, started) -> None:
    """Uses `handle` once (so it counts here), says so, then waits to be killed."""
    handle.qsize()
    started.set()
    time.sleep(TIMEOUT)


# --- latest-value mailbox -------------------------------------------------------------------

# A state dict: name -> (shape, dtype name). Mixed sizes and dtypes, ~0.5 MiB.
WEIGHTS = {
    "embed.weight": ((256, 256), "float32"),
    "block.0.weight": ((128, 256), "float64"),
    "block.0.bias": ((128,), "float64"),
    "block.1.running": ((64, 3), "int64"),
    "head.weight": ((7, 128), "float32"),
    "steps": ((), "int64"),
}


def weights(version: int) -> dict:
    """Version `version` of the weights: every array filled with the version number.

    NumPy arrays (`load_into` takes them as tensors): the writer and the `get` readers then
    run without torch, which spawn children take seconds to import.
    """
    state = {name: np.full(shape, version, dtype=dtype) for name, (shape, dtype) in WEIGHTS.items()}
    state["version"] = np.array(version, dtype=np.int64)
    return state


def zero_weights() -> dict:
    import torch

    state = {
        name: torch.zeros(shape, dtype=getattr(torch, dtype))
        for name, (shape, dtype) in WEIGHTS.items()
    }
    state["version"] = torch.tensor(0)
    return state


def torn(state: dict, version: int) -> list:
    """The names of the tensors (or arrays) of `state` that are not all `version`."""
    return [name for name, tensor in state.items() if not bool((tensor == version).all())]


def publish_versions(writer, first: int, last: int, started=None, go=None) -> int:
    """Publishes versions first..last as fast as possible, then closes the writer.

    `started`: set once the writer was used here (so it counts here); `go`: wait for it
    before publishing.
    """
    if started is not None:
        assert writer.version == first - 1
        started.set()
    if go is not None:
        assert go.wait(TIMEOUT), "never told to start"
    for version in range(first, last + 1):
        got = writer.publish(weights(version))
        assert got == version, f"publish {version} returned {got}"
    writer.close()
    return last


def publish_until(writer, first: int, enough: list, most: int, started) -> int:
    """Publishes versions from `first` on, as fast as possible, until every event in
    `enough` is set (or `most` versions), then closes the writer; returns the last.
    `started`: set once the writer was used here."""
    assert writer.version == first - 1
    started.set()
    version = first
    while True:
        got = writer.publish(weights(version))
        assert got == version, f"publish {version} returned {got}"
        if version >= most or all(event.is_set() for event in enough):
            writer.close()
            return version
        version += 1


def read_versions(reader, how: str, started, enough, count: int) -> dict:
    """Reads the newest version (`get`, or `load_into` a dict) until the writer closed;
    sets `enough` after `count` versions.

    Returns the versions seen, every torn or backwards one, and the most slab memory seen
    in use. `started` is set once the reader was used here and is ready.
    """
    target = zero_weights() if how == "load_into" else None
    assert reader.version >= 0  # used here: it counts in this process
    started.set()
    seen, problems, most_used = [], [], 0
    last = 0
    while True:
        try:
            if how == "get":
                version, state = reader.get(newer_than=last, timeout=TIMEOUT)
            else:
                version = reader.load_into(target, newer_than=last, timeout=TIMEOUT)
                state = target
        except tensorslab.Closed:
            break
        if version <= last:
            problems.append(f"version {version} after {last}")
        wrong = torn(state, version)
        if wrong:
            problems.append(f"version {version} torn: {wrong} not all {version}")
        if reader.version < version:
            problems.append(f"reader.version {reader.version} < version {version} just read")
        most_used = max(most_used, reader.stats()["slab_used_bytes"])
        seen.append(version)
        if len(seen) == count:
            enough.set()
        last = version
        del state
    return {"seen": seen, "problems": problems, "most_used": most_used}


def publish_then_wait(writer, count: int, started) -> None:
    """Publishes versions 1..count, says so, then waits to be killed."""
    for version in range(1, count + 1):
        writer.publish(weights(version))
    started.set()
    time.sleep(TIMEOUT)


def hold_newest(reader, ready) -> None:
    """Takes the newest version, keeps its views, says which, and waits to be killed."""
    version, value = reader.get(timeout=TIMEOUT)
    ready.put(version)
    time.sleep(TIMEOUT)
    del value


def versions_seen(reader, commands, replies) -> None:
    """Replies `reader.version` each time the parent asks; returns on "stop"."""
    replies.put("started")
    while commands.get(timeout=TIMEOUT) != "stop":
        replies.put(reader.version)


def make_module(seed: int):
    """A small module with parameters and buffers (BatchNorm: float and int64 buffers)."""
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 4)
    )


def load_into_module_and_dict(reader) -> dict:
    """Loads the newest version into a fresh module and into a dict of tensors; returns
    both states, and whether the module's tensors stayed the same objects in place."""
    import torch

    module = make_module(seed=2)
    before = {name: t.data_ptr() for name, t in module.state_dict(keep_vars=True).items()}
    params = [id(p) for p in module.parameters()]
    v_module = reader.load_into(module, timeout=TIMEOUT)
    state = module.state_dict(keep_vars=True)
    target = {name: torch.zeros_like(t) for name, t in state.items()}
    v_dict = reader.load_into(target, timeout=TIMEOUT)
    return {
        "versions": (v_module, v_dict),
        "module": {name: t.detach().clone() for name, t in state.items()},
        "dict": target,
        "in_place": before == {name: t.data_ptr() for name, t in state.items()}
        and params == [id(p) for p in module.parameters()],
    }
