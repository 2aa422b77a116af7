"""Rollout chunks: `Sender.alloc(spec)` and `alloc_like(example)` put a whole nested
structure of arrays and tensors in ONE slab block, which an actor fills step by step and
puts with no copy, and which the receiver gets as zero-copy views of that block.

Zero copy is checked on both sides without timing: the message adds only a small frame to
the slab (a copy of the 256 KiB observations could not fit in it), and a child receiver
writing into its views changes the chunk the sender still holds.
"""

from __future__ import annotations

import collections
import dataclasses
import gc
import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest
import torch

import tensorslab
from chunk_children import (
    OBS,
    Extra,
    N,
    T,
    act_put_then_exit,
    address,
    expected_layout,
    fill,
    fill_step,
    hold_until_killed,
    layout,
    learn_and_write_back,
    learn_rounds,
    leaves,
    materialise,
    rollout_spec,
    span,
    wrong_leaves,
)
from helpers import Child

CONTEXTS = ["fork", "spawn"]
# A frame describing the rollout (dtypes, shapes, references) is far below this; any leaf
# copied into it would not be: obs alone is T * N * OBS * 4 = 256 KiB.
FRAME_BOUND = 16 << 10


def occupancy(handle) -> tuple[int, int]:
    """(slab blocks in use, bytes they take), after collecting what nobody references."""
    gc.collect()
    stats = handle.stats()
    return stats["messages_in_flight"], stats["slab_used_bytes"]


def put_rollout(tx, seed: int):
    """An actor's whole job: allocate a chunk, fill it, put it; returns the chunk."""
    chunk = tx.alloc(rollout_spec())
    fill(chunk, seed)
    tx.put({"rollout": chunk, "version": seed}, timeout=10)
    return chunk


def wait_until(condition, *, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_one_block_holds_the_whole_chunk_until_both_sides_dropped_it():
    tx, rx = tensorslab.channel()
    with tx, rx:
        blocks, used = occupancy(tx)
        chunk = tx.alloc(rollout_spec())
        assert layout(chunk) == expected_layout(chunk)
        held_blocks, held_used = occupancy(tx)
        assert held_blocks == blocks + 1
        # One block: the leaves and their padding, plus one block header (64 bytes).
        assert span(chunk) <= held_used - used <= span(chunk) + 128
        fill(chunk, seed=3)
        tx.put({"rollout": chunk, "version": 3}, timeout=10)
        assert occupancy(tx) <= (blocks + 2, held_used + FRAME_BOUND)
        got = rx.get(timeout=10)
        # In one process the channel is mapped once: the views are the sender's memory.
        assert [address(leaf) for _, leaf in leaves(got["rollout"])] == [
            address(leaf) for _, leaf in leaves(chunk)
        ]
        assert wrong_leaves(got["rollout"], seed=3) == []
        del chunk
        assert occupancy(tx)[0] == blocks + 2, "the receiver's views hold message and chunk"
        del got
        assert occupancy(tx) == (blocks, used)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_rollout_round_trip_is_zero_copy_on_both_sides(ctx_name):
    tx, rx = tensorslab.channel()
    with tx, rx:
        blocks, _ = occupancy(tx)
        chunk = tx.alloc(rollout_spec(), timeout=10)
        for t in range(T):  # as an actor does, one environment step at a time
            fill_step(chunk, t, seed=7)
        _, held_used = occupancy(tx)
        tx.put({"rollout": chunk, "version": 7}, timeout=10)
        put_blocks, put_used = occupancy(tx)
        assert put_blocks == blocks + 2, "the chunk and one small frame"
        assert put_used - held_used < FRAME_BOUND, "put copied the chunk"
        report = Child(ctx_name, learn_and_write_back, rx, 7, timeout=120).start().join()
        assert report["wrong"] == []
        assert report["version"] == 7
        assert report["classes"] == ["Step", "Extra"]
        # The receiver's leaves lie in one block, exactly where the sender's do.
        assert report["layout"] == layout(chunk) == expected_layout(chunk)
        assert all(report["writable"]), "received NumPy arrays are writable, as on a channel"
        # What the receiver wrote into its views is in the chunk this process holds.
        assert chunk["rew"][0, 0] == -1.0
        assert chunk["obs"][T - 1, N - 1, OBS - 1].item() == -5.0
        assert chunk["extra"].seeds[1][0][6] == -9
        wait_until(lambda: occupancy(tx)[0] == blocks + 1, what="the child's message freed")
        del chunk
        assert occupancy(tx)[0] == blocks


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_the_sender_refills_the_same_chunk_after_the_receiver_released_it(ctx_name):
    tx, rx = tensorslab.channel()
    with tx, rx:
        blocks, _ = occupancy(tx)
        chunk = tx.alloc_like(materialise(rollout_spec()))
        assert occupancy(tx)[0] == blocks + 1
        seeds = [11, 12, 13]
        with Child(ctx_name, learn_rounds, rx, seeds, timeout=120) as learner:
            first = [address(leaf) for _, leaf in leaves(chunk)]
            for seed in seeds:
                fill(chunk, seed)
                tx.put({"rollout": chunk, "version": seed}, timeout=30)
                assert tx.wait_for_all_ack(timeout=60), "the learner never released the rollout"
                # Released: only the chunk is left, and it is the same memory every round.
                assert occupancy(tx)[0] == blocks + 1
                assert [address(leaf) for _, leaf in leaves(chunk)] == first
        assert learner.join() == [[], [], []]
        del chunk
        assert occupancy(tx)[0] == blocks


def test_a_chunk_put_twice_and_in_parts_is_freed_by_its_last_holder():
    tx, rx = tensorslab.channel()
    with tx, rx:
        blocks, used = occupancy(tx)
        chunk = put_rollout(tx, seed=5)
        # A subset: one step of a leaf, contiguous slices, a leaf: references, no copies.
        parts = {
            "obs_t": chunk["obs"][4],
            "act": chunk["act"][2:6],
            "mask": chunk["extra"].mask,
            "seeds": chunk["extra"].seeds[1][0][3:],
        }
        tx.put(parts, timeout=10)
        assert occupancy(tx)[0] == blocks + 3, "the chunk once, two frames"
        whole, part = rx.get(timeout=10), rx.get(timeout=10)
        for name, view in parts.items():
            assert address(part[name]) == address(view), name
        assert address(whole["rollout"]["obs"]) == address(chunk["obs"])
        del chunk, parts, view
        gc.collect()
        del whole
        # The second message alone still holds the block: its views stay intact.
        assert occupancy(tx)[0] == blocks + 2
        expected_obs = torch.arange(N * OBS, dtype=torch.float32).reshape(N, OBS) + 5004
        assert torch.equal(part["obs_t"], expected_obs)
        del part
        assert occupancy(tx) == (blocks, used)


def test_a_strided_slice_of_a_chunk_is_copied_into_the_frame():
    """The wire format references C-contiguous ranges only: a strided view of a leaf
    travels as a copy (correct values, in the frame), the rest still by reference."""
    tx, rx = tensorslab.channel()
    with tx, rx:
        chunk = tx.alloc({"obs": ((T, N, OBS), torch.float32), "rew": ((T, N), np.float32)})
        chunk["obs"][:] = torch.arange(T * N * OBS, dtype=torch.float32).reshape(T, N, OBS)
        chunk["rew"][:] = 2.5
        _, before = occupancy(tx)
        tx.put({"column": chunk["obs"][:, :, 0], "rew": chunk["rew"]}, timeout=10)
        assert occupancy(tx)[1] - before >= T * N * 4
        got = rx.get(timeout=10)
        assert torch.equal(got["column"], chunk["obs"][:, :, 0])
        assert address(got["rew"]) == address(chunk["rew"])
        del chunk, got


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_receiver_killed_while_holding_the_chunk_frees_it(ctx_name):
    tx, rx = tensorslab.channel()
    with tx, rx:
        blocks, used = occupancy(tx)
        chunk = put_rollout(tx, seed=2)
        ready = mp.get_context(ctx_name).Event()
        holder = Child(ctx_name, hold_until_killed, rx, ready, timeout=120).start()
        try:
            assert ready.wait(60), "the receiver never took the rollout"
            del chunk
            assert occupancy(tx)[0] == blocks + 2, "the receiver holds message and chunk"
            os.kill(holder.pid, signal.SIGKILL)
            holder.join(expect_exitcode=None)
            wait_until(lambda: occupancy(tx) == (blocks, used), what="the dead receiver's chunk")
        finally:
            holder.kill()
        # The channel still works.
        again = put_rollout(tx, seed=4)
        assert wrong_leaves(rx.get(timeout=10)["rollout"], seed=4) == []
        del again


@pytest.mark.parametrize("how", ["return", "close", "os._exit"])
@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_rollouts_survive_their_actor_exiting_after_put(ctx_name, how):
    tx, rx = tensorslab.channel(capacity=16)
    count = 3
    with Child(ctx_name, act_put_then_exit, tx, 20, count, how, timeout=120) as actor:
        pass
    if how != "os._exit":
        assert actor.join() == {"blocks_while_held": [1] * count}
    tx.close()
    for index in range(count):
        message = rx.get(timeout=30)
        assert message["version"] == 20 + index
        assert wrong_leaves(message["rollout"], seed=20 + index) == []
        assert layout(message["rollout"]) == expected_layout(message["rollout"])
        del message
    with pytest.raises(tensorslab.Closed):
        rx.get(timeout=10)
    wait_until(lambda: occupancy(rx) == (0, 0), what="every rollout freed")


# ---- specs and examples ---------------------------------------------------------------------


Pair = collections.namedtuple("Pair", "first second")


@dataclasses.dataclass(frozen=True)
class Frozen:
    weights: object
    bias: object


def test_leaf_rule_and_containers():
    tx, rx = tensorslab.channel()
    with tx, rx:
        spec = {
            # Two leaves in a 2-tuple: its second item is a leaf, not a dtype.
            "pair": (((2,), np.float32), ((3,), torch.int64)),
            "dtypes": [(4, "int16"), ((), float), ((2, 2), np.dtype(">u4")), ((1,), torch.bool)],
            "named": Pair(((5,), np.uint8), ((0, 3), torch.float64)),
            "frozen": Frozen(((2, 3), torch.bfloat16), {"b": ((3,), np.complex64)}),
            "ordered": collections.OrderedDict(z=((1,), np.int8), a=((1,), np.int8)),
            "default": collections.defaultdict(list, x=((2,), np.int32)),
            "empty": [(), {}],
        }
        chunk = tx.alloc(spec)
        assert occupancy(tx)[0] == 1
        pair = chunk["pair"]
        assert type(pair) is tuple and pair[0].dtype == np.float32 and pair[1].dtype == torch.int64
        assert [(tuple(a.shape), str(a.dtype)) for a in chunk["dtypes"]] == [
            ((4,), "int16"),
            ((), "float64"),
            ((2, 2), ">u4"),
            ((1,), "torch.bool"),
        ]
        assert type(chunk["named"]) is Pair and chunk["named"].second.shape == (0, 3)
        assert type(chunk["frozen"]) is Frozen and chunk["frozen"].weights.dtype == torch.bfloat16
        assert (
            list(chunk["ordered"]) == ["z", "a"]
            and type(chunk["ordered"]) is collections.OrderedDict
        )
        assert chunk["default"].default_factory is list
        assert chunk["empty"] == [(), {}]
        for _, leaf in leaves(chunk):
            if isinstance(leaf, np.ndarray):
                leaf[...] = 1
            else:
                leaf.fill_(1)
        tx.put(chunk, timeout=10)
        got = rx.get(timeout=10)
        assert type(got["frozen"]) is Frozen and type(got["named"]) is Pair
        assert [tuple(leaf.shape) for _, leaf in leaves(got)] == [
            tuple(leaf.shape) for _, leaf in leaves(chunk)
        ]
        del chunk, got


def test_alloc_like_copies_structure_shapes_and_dtypes_not_values():
    tx, rx = tensorslab.channel()
    with tx, rx:
        example = {
            "obs": torch.full((3, 4), 9.0),
            "act": np.full((3,), 9, np.int64),
            "p": Pair(
                torch.ones(2, dtype=torch.float16, requires_grad=True), np.ones((1, 2), "<c8")
            ),
            "e": Extra(np.zeros((0,), np.uint8), [torch.nn.Parameter(torch.ones(2))]),
        }
        chunk = tx.alloc_like(example)
        assert occupancy(tx)[0] == 1
        for (path, got), (_, want) in zip(leaves(chunk), leaves(example)):
            kind = torch.Tensor if isinstance(want, torch.Tensor) else np.ndarray
            assert type(got) is kind, path  # plain tensors, never Parameters
            assert tuple(got.shape) == tuple(want.shape) and got.dtype == want.dtype, path
            assert address(got) != address(want), path
        assert not chunk["p"].first.requires_grad
        assert type(chunk["p"]) is Pair and type(chunk["e"]) is Extra
        del chunk


@pytest.mark.parametrize(
    ("spec", "error", "fragments"),
    [
        ({"obs": ((3,), "no-such-type")}, TypeError, ["spec['obs']: ", "no-such-type"]),
        (
            {"a": [((2, 2), np.float32), ((3, -1), np.uint8)]},
            ValueError,
            ["spec['a'][1]: ", "shape[1] is -1"],
        ),
        ({"a": ((2, "x"), np.uint8)}, TypeError, ["spec['a']: ", "shape must be"]),
        (
            {"a": ((2,), np.uint8), "b": 5},
            TypeError,
            ["spec['b']: ", "(shape, dtype) pair", "int 5"],
        ),
        (Pair(((1,), np.uint8), Frozen(None, None)), TypeError, ["spec[1].weights: ", "NoneType"]),
        ({"o": ((2,), object)}, TypeError, ["spec['o']: ", "object dtype"]),
        ({"t": ((2,), torch.quint8)}, TypeError, ["spec['t']: ", "torch.quint8"]),
        ({"big": ((2**62, 2), torch.float64)}, ValueError, ["spec['big']: ", str(2**66)]),
        # Each leaf fits in memory on its own; together they do not.
        (
            {"a": ((2**62,), np.uint8), "b": ((2**62,), np.uint8)},
            ValueError,
            ["spec: its 2 arrays", str(2**63)],
        ),
        (
            {"a": ((5,), np.uint8), "b": ((2**63 - 64,), np.uint8)},
            ValueError,
            ["spec: its 2 arrays", str(2**63)],
        ),
        ({"a": ((1 << 28,), np.float32)}, ValueError, ["max_slab_bytes", str(1 << 30)]),
        ((3, 4), TypeError, ["alloc((3, 4)) has no dtype", "alloc(shape, dtype)"]),
    ],
)
def test_a_bad_spec_names_its_path_and_allocates_nothing(spec, error, fragments):
    refused_alloc(lambda tx: tx.alloc(spec), error, fragments)


def refused_alloc(call, error: type, fragments: list[str]) -> None:
    """`call(tx)` raises `error` whose message holds every fragment, and allocates nothing."""
    tx, rx = tensorslab.channel(max_slab_bytes=64 << 20)
    with tx, rx:
        before = occupancy(tx)
        with pytest.raises(error) as caught:
            call(tx)
        for fragment in fragments:
            assert fragment in str(caught.value), f"{fragment!r} not in {caught.value}"
        assert occupancy(tx) == before, "a refused alloc kept slab memory"


def test_a_spec_that_contains_itself_is_refused():
    spec: list = [((1,), np.uint8)]
    spec.append(spec)
    tx, rx = tensorslab.channel()
    with tx, rx, pytest.raises(ValueError, match=r"spec\[1\]\[1\].*nested deeper than 128"):
        tx.alloc(spec)
    del spec[1]  # break the cycle


@pytest.mark.parametrize(
    ("example", "fragments"),
    [
        (
            {"a": np.zeros(2), "b": [1]},
            ["example['b'][0]: ", "np.ndarray or a torch.Tensor", "int 1"],
        ),
        (
            {"a": ((2,), np.float32)},
            ["example['a']: ", "(shape, dtype) pair", "pass a spec to alloc"],
        ),
        ({"o": np.array([None, 1])}, ["example['o']: ", "object dtype"]),
    ],
)
def test_a_bad_example_names_its_path_and_allocates_nothing(example, fragments):
    refused_alloc(lambda tx: tx.alloc_like(example), TypeError, fragments)
