"""Rollout chunks (`Sender.alloc(spec)`) for tests/test_chunks.py: the spec, how an actor
fills it step by step, what a learner checks, and the functions children run.

Importable, so `spawn` children find them (and the named tuple and dataclass by name).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, NamedTuple

import numpy as np
import torch

T, N, OBS = 32, 16, 128  # obs alone is 256 KiB: a copy of it could not hide in a frame
GET_TIMEOUT = 60


class Step(NamedTuple):
    logits: Any
    value: Any


@dataclasses.dataclass
class Extra:
    mask: Any
    seeds: Any


def rollout_spec() -> dict:
    """Torch and NumPy leaves, nested in a dict, a list, a tuple, a named tuple and a
    dataclass, with sizes that are not multiples of 64 (so alignment shows)."""
    return {
        "obs": ((T, N, OBS), torch.float32),
        "act": ((T, N), torch.int64),
        "rew": ((T, N), np.float32),
        "done": ((T, N), np.bool_),
        "policy": Step(((T, N, 3), torch.float16), ((T, N), "float64")),
        "extra": Extra(((T, 5), np.uint8), [((T,), torch.int32), (((7,), np.int16),)]),
    }


def leaves(structure, path: str = "") -> list[tuple[str, Any]]:
    """(path, array or tensor) of every leaf, in the order `alloc` lays them out."""
    if isinstance(structure, (np.ndarray, torch.Tensor)):
        return [(path, structure)]
    if isinstance(structure, dict):
        items = [(f"[{key!r}]", value) for key, value in structure.items()]
    elif dataclasses.is_dataclass(structure):
        items = [(f".{f.name}", getattr(structure, f.name)) for f in dataclasses.fields(structure)]
    else:
        items = [(f"[{index}]", value) for index, value in enumerate(structure)]
    return [leaf for segment, value in items for leaf in leaves(value, path + segment)]


def address(leaf) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.data_ptr()
    return leaf.__array_interface__["data"][0]


def nbytes(leaf) -> int:
    if isinstance(leaf, torch.Tensor):
        return leaf.numel() * leaf.element_size()
    return leaf.nbytes


def expected_layout(structure) -> list[tuple[str, int, int]]:
    """(path, offset, nbytes) of each leaf as `alloc` documents it: one after another, each
    at the next multiple of 64 bytes."""
    layout, end = [], 0
    for path, leaf in leaves(structure):
        offset = -(-end // 64) * 64
        layout.append((path, offset, nbytes(leaf)))
        end = offset + nbytes(leaf)
    return layout


def layout(structure) -> list[tuple[str, int, int]]:
    """(path, offset from the first leaf, nbytes) of each leaf, as found in memory."""
    found = leaves(structure)
    base = address(found[0][1])
    return [(path, address(leaf) - base, nbytes(leaf)) for path, leaf in found]


def span(structure) -> int:
    """Bytes from the first leaf's start to the last one's end."""
    _, offset, size = expected_layout(structure)[-1]
    return offset + size


def fill_step(chunk, t: int, seed: int) -> None:
    """What an actor writes at step `t`: one row of every leaf, in place."""
    base = seed * 1000 + t
    chunk["obs"][t] = torch.arange(N * OBS, dtype=torch.float32).reshape(N, OBS) + base
    chunk["act"][t] = torch.arange(N) * (t + 1) + seed
    chunk["rew"][t] = np.float32(base) / 8
    chunk["done"][t] = (np.arange(N) + t + seed) % 3 == 0
    chunk["policy"].logits[t] = float(t % 7) - seed
    chunk["policy"].value[t] = np.arange(N) + base / 4
    chunk["extra"].mask[t] = (t + seed) % 256
    chunk["extra"].seeds[0][t] = base
    if t == 0:
        chunk["extra"].seeds[1][0][:] = np.arange(7, dtype=np.int16) - seed


def fill(chunk, seed: int) -> None:
    for t in range(T):
        fill_step(chunk, t, seed)


def as_numpy(leaf) -> np.ndarray:
    return leaf.numpy() if isinstance(leaf, torch.Tensor) else np.asarray(leaf)


def wrong_leaves(got, seed: int) -> list[str]:
    """Paths of the leaves of `got` that differ from a chunk filled with `seed` (types,
    shapes and dtypes included)."""
    want = build_reference(seed)
    wrong = []
    for (path, have), (_, expected) in zip(leaves(got), leaves(want)):
        if type(have) is not type(expected) or tuple(have.shape) != tuple(expected.shape):
            wrong.append(f"{path}: {type(have).__name__} {tuple(have.shape)}")
        elif have.dtype != expected.dtype or not np.array_equal(as_numpy(have), as_numpy(expected)):
            wrong.append(f"{path}: values or dtype differ")
    if len(leaves(got)) != len(leaves(want)):
        wrong.append(f"{len(leaves(got))} leaves, expected {len(leaves(want))}")
    return wrong


def build_reference(seed: int):
    """A private chunk filled with `seed`: the same structure in ordinary memory."""
    spec = rollout_spec()
    chunk = materialise(spec)
    fill(chunk, seed)
    return chunk


def materialise(spec):
    if isinstance(spec, tuple) and type(spec) is tuple and len(spec) == 2 and is_dtype(spec[1]):
        shape, dtype = spec
        if isinstance(dtype, torch.dtype):
            return torch.zeros(shape, dtype=dtype)
        return np.zeros(shape, dtype)
    if isinstance(spec, dict):
        return {key: materialise(value) for key, value in spec.items()}
    if isinstance(spec, Step):
        return Step(*(materialise(value) for value in spec))
    if isinstance(spec, Extra):
        return Extra(materialise(spec.mask), materialise(spec.seeds))
    if isinstance(spec, list):
        return [materialise(value) for value in spec]
    return tuple(materialise(value) for value in spec)


def is_dtype(value) -> bool:
    return isinstance(value, (torch.dtype, np.dtype, type, str))


def describe(message) -> dict:
    """What a learner reports about a received rollout message."""
    rollout = message["rollout"]
    return {
        "version": message["version"],
        "layout": layout(rollout),
        "classes": [type(rollout["policy"]).__name__, type(rollout["extra"]).__name__],
        "writable": [
            bool(leaf.flags.writeable)
            for _, leaf in leaves(rollout)
            if isinstance(leaf, np.ndarray)
        ],
    }


# --- what children run ---------------------------------------------------------------------


def learn_and_write_back(rx, seed: int) -> dict:
    """Take one rollout, check it, report its layout, then write into the received views
    (the sender still holds the chunk and sees it if and only if nothing was copied)."""
    message = rx.get(timeout=GET_TIMEOUT)
    report = describe(message)
    report["wrong"] = wrong_leaves(message["rollout"], seed)
    rollout = message["rollout"]
    rollout["rew"][0, 0] = -1.0
    rollout["obs"][T - 1, N - 1, OBS - 1] = -5.0
    rollout["extra"].seeds[1][0][6] = -9
    return report


def learn_rounds(rx, seeds: list[int]) -> list[list[str]]:
    """Take one rollout per seed, check each, release it before taking the next."""
    wrong = []
    for seed in seeds:
        message = rx.get(timeout=GET_TIMEOUT)
        wrong.append(
            wrong_leaves(message["rollout"], seed)
            + ([] if message["version"] == seed else [f"version {message['version']}"])
        )
        del message
    return wrong


def act_put_then_exit(tx, seed: int, count: int, how: str) -> dict:
    """An actor: allocate a chunk per rollout, fill it step by step, put it, drop it; then
    exit `how` (returning, after `close()`, or with `os._exit`: no clean-up at all)."""
    blocks_while_held = []
    for index in range(count):
        # Nobody takes messages while this runs, so only this actor changes the count.
        before = tx.stats()["messages_in_flight"]
        chunk = tx.alloc(rollout_spec(), timeout=30)
        blocks_while_held.append(tx.stats()["messages_in_flight"] - before)
        for t in range(T):
            fill_step(chunk, t, seed + index)
        tx.put({"rollout": chunk, "version": seed + index}, timeout=30)
        del chunk
    if how == "close":
        tx.close()
    elif how == "os._exit":
        os._exit(0)
    return {"blocks_while_held": blocks_while_held}


def hold_until_killed(rx, ready) -> None:
    """Take a rollout, keep its views, say so, and wait to be SIGKILLed."""
    message = rx.get(timeout=GET_TIMEOUT)
    assert message["rollout"]["obs"].shape == (T, N, OBS)
    ready.set()
    time.sleep(600)
