"""tensorslab in one minute: send arrays, tensors and nested values to another process, check
them on arrival, then compare tensorslab's throughput with multiprocessing.Queue.

    python examples/demo.py           # what `make demo` runs
    python examples/demo.py --smoke   # a few seconds (CI)

The checking process is started with ``spawn``: it rebuilds the same sample messages (they are
seeded) and compares each arrival with its twin, type for type and byte for byte, then sends
its verdict back through a second channel.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import decimal
import enum
import math
import multiprocessing as mp
import sys
import uuid
from collections import Counter, defaultdict, namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import torch

import tensorslab

# The throughput half reuses the benchmark's transports and measuring loop.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benches"))
import harness  # noqa: E402
from payloads import format_bytes  # noqa: E402
from transports import TRANSPORTS  # noqa: E402

Point = namedtuple("Point", "x y")


class Phase(enum.Enum):
    TRAIN = "train"
    EVAL = "eval"


@dataclasses.dataclass
class Episode:
    id: int
    frames: np.ndarray
    returns: list


def sample_messages() -> list[tuple[str, Any]]:
    """The messages sent, with a line saying what each shows. Seeded: both processes build the
    same ones."""
    rng = np.random.default_rng(1)
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(1)  # nn.Linear draws its initial weights from the global generator
    shared = rng.random((3, 4))
    return [
        (
            "an RL step: torch obs, numpy mask, a tuple tag",
            {
                "step": 0,
                "obs": torch.randn(8, 3, 84, 84, generator=gen),
                "mask": np.ones(8, bool),
                "tag": ("actor", 3),
            },
        ),
        (
            "numpy dtypes: float16, complex64, datetime64, structured; a transposed view; 0-d",
            {
                "half": rng.random(5).astype(np.float16),
                "complex": (rng.random(4) + 1j * rng.random(4)).astype(np.complex64),
                "when": np.array(["2024-01-01", "2025-06-30"], "datetime64[D]"),
                "record": np.array([(1, 2.5), (2, -1.0)], [("id", "i4"), ("score", "f8")]),
                "transposed": rng.random((6, 5)).T,
                "scalar": np.array(3.5),
                "empty": np.zeros((0, 7), np.int32),
            },
        ),
        (
            "torch dtypes: bfloat16, bool, int8; requires_grad and nn.Parameter kept",
            {
                "bf16": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
                "flags": torch.tensor([True, False, True]),
                "int8": torch.arange(-4, 4, dtype=torch.int8),
                "grad": torch.randn(3, generator=gen).requires_grad_(),
                "param": torch.nn.Parameter(torch.ones(2, 2)),
            },
        ),
        (
            "a state_dict (an OrderedDict of tensors)",
            torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
            .requires_grad_(False)
            .state_dict(),
        ),
        (
            "plain Python values: big int, NaN, -0.0, complex, bytes, set, namedtuple, Enum, "
            "dataclass, datetime with tz, Decimal, UUID, range, slice, None, Ellipsis",
            {
                "big": 2**100 + 1,
                "nan": float("nan"),
                "negzero": -0.0,
                "z": 1 - 2j,
                "raw": b"\x00\xffbytes",
                "tags": {"a", "b"},
                "frozen": frozenset({1, 2}),
                "point": Point(1, 2.0),
                "phase": Phase.EVAL,
                "episode": Episode(7, np.arange(6, dtype=np.uint8).reshape(2, 3), [1.0, 0.5]),
                "at": datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc),
                "price": decimal.Decimal("12.50"),
                "id": uuid.UUID(int=42),
                "span": range(0, 10, 2),
                "cut": slice(1, None, 2),
                "nothing": None,
                "dots": ...,
                "counts": Counter("abracadabra"),
                "lists": defaultdict(list, {"x": [1]}),
                "shape": torch.Size([2, 3]),
                "dtype": torch.float16,
                "np_dtype": np.dtype("int16"),
            },
        ),
        ("one array referenced twice arrives as one object", {"a": shared, "b": shared}),
    ]


def differences(sent: Any, got: Any, path: str = "msg") -> list[str]:
    """Where ``got`` differs from ``sent``: types, dtypes, shapes, values (NaN equals NaN)."""
    if type(sent) is not type(got):
        return [f"{path}: sent {type(sent).__name__}, got {type(got).__name__}"]
    if isinstance(sent, torch.Tensor):
        same = (sent.dtype, sent.shape, sent.requires_grad) == (
            got.dtype,
            got.shape,
            got.requires_grad,
        )
        return (
            [] if same and torch.equal(sent.detach(), got.detach()) else [f"{path}: tensor differs"]
        )
    if isinstance(sent, np.ndarray):
        nan_ok = sent.dtype.kind in "fc"
        same = sent.dtype == got.dtype and sent.shape == got.shape
        return (
            []
            if same and np.array_equal(sent, got, equal_nan=nan_ok)
            else [f"{path}: array differs"]
        )
    if isinstance(sent, dict):
        if list(sent) != list(got):
            return [f"{path}: keys {list(sent)} != {list(got)}"]
        if isinstance(sent, defaultdict) and sent.default_factory is not got.default_factory:
            return [f"{path}: default_factory differs"]
        return [d for k in sent for d in differences(sent[k], got[k], f"{path}[{k!r}]")]
    if isinstance(sent, (list, tuple)):
        if len(sent) != len(got):
            return [f"{path}: length {len(sent)} != {len(got)}"]
        return [
            d for i, (a, b) in enumerate(zip(sent, got)) for d in differences(a, b, f"{path}[{i}]")
        ]
    if dataclasses.is_dataclass(sent):
        return [
            d
            for f in dataclasses.fields(sent)
            for d in differences(getattr(sent, f.name), getattr(got, f.name), f"{path}.{f.name}")
        ]
    if isinstance(sent, float) and math.isnan(sent):
        return [] if math.isnan(got) else [f"{path}: {got!r} is not NaN"]
    if isinstance(sent, float) and math.copysign(1, sent) != math.copysign(1, got):
        return [f"{path}: sign of zero lost"]
    return [] if sent == got else [f"{path}: sent {sent!r}, got {got!r}"]


def checker(rx: tensorslab.Receiver, replies: tensorslab.Sender) -> None:
    """The other process: compare every arrival with its twin, reply with the verdict."""
    problems, checked = [], 0
    expected = sample_messages()
    for (what, sent), got in zip(expected, rx):
        problems += [f"{what}: {p}" for p in differences(sent, got)]
        if "referenced twice" in what and got["a"] is not got["b"]:
            problems.append(f"{what}: arrived as two objects")
        checked += 1
        del got  # releases the message's slab memory
    if checked < len(expected):
        problems.append(f"only {checked} of {len(expected)} messages arrived")
    replies.put({"checked": checked, "problems": problems})
    replies.close()


def show_round_trip() -> bool:
    print(__doc__.split("\n\n")[0] + "\n")
    ctx = mp.get_context("spawn")
    tx, rx = tensorslab.channel(capacity=4)
    replies_tx, replies_rx = tensorslab.channel(capacity=1)
    child = ctx.Process(target=checker, args=(rx, replies_tx))
    child.start()
    rx.close()  # the child holds its own handles now
    replies_tx.close()
    try:
        for what, msg in sample_messages():
            tx.put(msg, timeout=60)
            print(f"  sent {what}")
        tx.close()  # were a message lost, this would end the checker's `for ... in rx`
        verdict = replies_rx.get(timeout=120)
    finally:
        child.join(30)
        if child.is_alive():
            child.terminate()
    problems = verdict["problems"]
    print(f"\nchecked {verdict['checked']} messages in process {child.pid}: ", end="")
    print(
        "\n".join([f"{len(problems)} mismatches"] + [f"  {p}" for p in problems])
        if problems
        else "all arrived intact"
    )
    print(
        "Each message was copied once into shared memory the channel keeps mapped; the\n"
        "receiver got zero-copy views, released when it dropped them.\n"
    )
    return not verdict["problems"]


def show_throughput(cases: list[str], opts: harness.Options) -> None:
    print("Throughput, one producer and one consumer process; the consumer touches every page:")
    results = {}
    for name in ("tensorslab", "mp.Queue"):
        print(f"  measuring {name} ...", flush=True)
        results[name] = harness.run_throughput(TRANSPORTS[name], cases, opts, lambda *_: None)
    print(f"{'message':>10} {'tensorslab':>14} {'mp.Queue':>14} {'ratio':>9}")
    for case in cases:
        ours, theirs = results["tensorslab"][case], results["mp.Queue"][case]
        if "messages_per_s" not in ours or "messages_per_s" not in theirs:
            failed = ours.get("error") or theirs.get("error", "?")
            print(f"{case:>10}  failed: {failed.strip().splitlines()[-1]}")
            continue
        a, b = (r["messages_per_s"] * r["bytes"] / 2**30 for r in (ours, theirs))
        print(f"{format_bytes(ours['bytes']):>10} {a:>9.2f} GiB/s {b:>9.2f} GiB/s {a / b:>8.1f}x")
    print("\nThe full comparison (torch queues, shared memory per message, memcpy): make bench")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    args = parser.parse_args()
    ok = show_round_trip()
    if args.smoke:
        show_throughput(["64KiB", "1MiB"], harness.Options(1, 0.02, 0.01, 0.5))
    else:
        show_throughput(["64KiB", "1MiB", "16MiB", "64MiB"], harness.Options(1, 0.3, 0.1, 2.0))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
