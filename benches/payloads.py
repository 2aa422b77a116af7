"""The messages the benchmark sends, and the one way every consumer touches them.

A *case* is a named payload: a flat ``uint8`` array of a given size (``64B`` … ``8GiB``) or one
of three realistic messages (a DataLoader batch, an RL rollout chunk, a model ``state_dict``).
Every case can be built in two *forms*: ``numpy`` (arrays are ``np.ndarray``) and ``torch``
(the same arrays wrapped as ``torch.Tensor``). Transports that pickle get the numpy form, because
importing torch registers torch's shared-memory reducers in ``multiprocessing``'s pickler and a
tensor sent through a plain ``mp.Queue`` would silently take torch's path instead.

This module imports torch only when a torch form is asked for, so the numpy-only transports do
not pay torch's import (about 3 s and 650 MB per process).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any, Callable

import numpy as np

PAGE = 4096
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

SIZE_CASES = ["64B", "1KiB", "64KiB", "1MiB", "16MiB", "128MiB", "1GiB"]
HUGE_CASE = "8GiB"
REALISTIC_CASES = ["batch", "rollout", "state_dict"]

DESCRIPTIONS = {
    "batch": 'DataLoader batch {"image": float32[64,3,224,224], "label": int64[64], '
    '"meta": {"idx": 64 ints, "path": 64 strs}}',
    "rollout": "RL rollout chunk: 6 tensors of [128,16,...] (uint8 obs [128,16,4,84,84]) "
    "plus 4 scalars",
    "state_dict": "model state_dict: OrderedDict of 294 float32 tensors "
    "(24-layer transformer, width 288), ~106 MB",
}

_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": GiB}


def size_of(case: str) -> int | None:
    """Bytes of a size case such as ``64KiB``; None for a realistic case."""
    match = re.fullmatch(r"(\d+)(B|KiB|MiB|GiB)", case)
    return int(match.group(1)) * _UNITS[match.group(2)] if match else None


def check_case(case: str) -> str:
    if size_of(case) is None and case not in REALISTIC_CASES:
        raise ValueError(
            f"unknown case {case!r}: use a size such as 64B, 4KiB, 16MiB, 1GiB "
            f"or one of {', '.join(REALISTIC_CASES)}"
        )
    return case


def format_bytes(n: float) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if n >= _UNITS[unit]:
            value = n / _UNITS[unit]
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n:.0f} B"


# ---------------------------------------------------------------------------------------------
# Realistic messages, described as shapes so their size is known without building them.

_D_MODEL, _LAYERS, _VOCAB, _CONTEXT = 288, 24, 4096, 1024


def _state_dict_shapes() -> list[tuple[str, tuple[int, ...]]]:
    d = _D_MODEL
    shapes = [("tok_emb.weight", (_VOCAB, d)), ("pos_emb.weight", (_CONTEXT, d))]
    for i in range(_LAYERS):
        p = f"layers.{i}."
        shapes += [
            (p + "ln1.weight", (d,)),
            (p + "ln1.bias", (d,)),
            (p + "attn.qkv.weight", (3 * d, d)),
            (p + "attn.qkv.bias", (3 * d,)),
            (p + "attn.proj.weight", (d, d)),
            (p + "attn.proj.bias", (d,)),
            (p + "ln2.weight", (d,)),
            (p + "ln2.bias", (d,)),
            (p + "mlp.fc1.weight", (4 * d, d)),
            (p + "mlp.fc1.bias", (4 * d,)),
            (p + "mlp.fc2.weight", (d, 4 * d)),
            (p + "mlp.fc2.bias", (d,)),
        ]
    shapes += [("ln_f.weight", (d,)), ("ln_f.bias", (d,)), ("head.weight", (_VOCAB, d))]
    return shapes


_ROLLOUT = {  # name: (shape, dtype); T=128 steps, B=16 environments
    "obs": ((128, 16, 4, 84, 84), np.uint8),
    "action": ((128, 16), np.int64),
    "reward": ((128, 16), np.float32),
    "done": ((128, 16), np.bool_),
    "logits": ((128, 16, 18), np.float32),
    "value": ((128, 16), np.float32),
}


def case_nbytes(case: str) -> int:
    """Payload bytes of a case: the bytes of its arrays (what throughput is computed from)."""
    size = size_of(case)
    if size is not None:
        return size
    if case == "batch":
        return 64 * 3 * 224 * 224 * 4 + 64 * 8
    if case == "rollout":
        return sum(int(np.prod(s)) * np.dtype(t).itemsize for s, t in _ROLLOUT.values())
    if case == "state_dict":
        return sum(int(np.prod(s)) * 4 for _, s in _state_dict_shapes())
    raise ValueError(f"unknown case {case!r}")


def build_payload(case: str, form: str = "numpy") -> Any:
    """A fresh payload for ``case`` in ``form`` (``numpy`` or ``torch``)."""
    rng = np.random.default_rng(0)
    size = size_of(case)
    if size is not None:
        # np.full writes every page: a calloc'd array of untouched zero pages copies faster
        # than real data and would flatter whoever reads it.
        payload: Any = np.full(size, 7, np.uint8)
    elif case == "batch":
        payload = {
            "image": rng.random((64, 3, 224, 224), dtype=np.float32),
            "label": rng.integers(0, 1000, 64, dtype=np.int64),
            "meta": {
                "idx": [int(i) for i in rng.integers(0, 1_281_167, 64)],
                "path": [
                    f"train/n{1440764 + i:08d}/n{1440764 + i:08d}_{i * 37}.JPEG" for i in range(64)
                ],
            },
        }
    elif case == "rollout":
        payload = {name: np.full(shape, 1, dtype) for name, (shape, dtype) in _ROLLOUT.items()}
        payload.update(actor_id=3, policy_version=17, episode_return=12.5, frames=2048)
    elif case == "state_dict":
        payload = OrderedDict(
            (name, rng.standard_normal(shape, dtype=np.float32))
            for name, shape in _state_dict_shapes()
        )
    else:
        raise ValueError(f"unknown case {case!r}")
    if form == "torch":
        import torch

        payload = map_arrays(payload, torch.from_numpy)
    return payload


# ---------------------------------------------------------------------------------------------
# Walking messages.


def is_tensor(obj: Any) -> bool:
    # Duck-typed so processes that never import torch never have to.
    return type(obj).__module__.startswith("torch") and hasattr(obj, "untyped_storage")


def map_arrays(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` with every array or tensor leaf replaced by ``fn(leaf)``; containers rebuilt."""
    if isinstance(obj, np.ndarray) or is_tensor(obj):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((key, map_arrays(value, fn)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(map_arrays(value, fn) for value in obj)
    return obj


def arrays(obj: Any) -> list[Any]:
    found: list[Any] = []
    map_arrays(obj, found.append)
    return found


def byte_view(array: Any) -> np.ndarray:
    """A flat ``uint8`` numpy view of a contiguous array or CPU tensor (no copy)."""
    if is_tensor(array):
        array = array.detach().numpy()
    return array.reshape(-1).view(np.uint8)


def touch(obj: Any) -> int:
    """Read one byte per 4 KiB page of every array in ``obj``: the consumer's work, the same
    for every transport. It faults in every page a transport maps lazily, so a transport cannot
    look fast by handing over memory nobody could read yet."""
    return sum(_touch_array(a) for a in arrays(obj))


def _touch_array(array: Any) -> int:
    flat = byte_view(array)
    if flat.size <= PAGE:  # one page: indexing costs 0.1 µs where a reduction costs 2 µs
        return int(flat[0]) if flat.size else 0
    return int(flat[::PAGE].sum())


def fill_pages(array: Any, value: int) -> None:
    """Write one byte per 4 KiB page: the producer's cheap stand-in for filling a buffer."""
    byte_view(array)[::PAGE] = value & 0xFF


def empty_like_aligned(source: np.ndarray) -> np.ndarray:
    """An uninitialised array like ``source`` at the same address modulo 4096, so a copy between
    them is free of 4K aliasing (a destination a few dozen bytes past its source runs ~10x
    slower at 32-128 KiB): the memcpy reference must be the best case."""
    raw = np.empty(source.nbytes + 2 * PAGE, np.uint8)
    start = (source.ctypes.data - raw.ctypes.data) % PAGE
    return raw[start : start + source.nbytes].view(source.dtype).reshape(source.shape)
