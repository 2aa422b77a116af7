"""Lifetimes: views keep their memory valid; memory returns to the slab when, and only
when, the last view (derived ones included) is gone; the slab does not grow in a loop."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import torch

import children
import tensorslab
from helpers import Child, get_until_closed

MiB = 1 << 20
STATS_KEYS = {
    "slab_mapped_bytes",
    "slab_used_bytes",
    "messages_in_flight",
    "queued",
    "capacity",
    "max_slab_bytes",
    "messages_sent",
    "bytes_sent",
    "messages_received",
    "bytes_received",
    "put_blocked_seconds",
    "get_blocked_seconds",
}


def used(handle) -> int:
    gc.collect()
    return handle.stats()["slab_used_bytes"]


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_views_outlive_their_messages(ctx_name):
    """Hold the arrays of 20 messages from a child that has exited; all stay intact."""
    tx, rx = tensorslab.channel(capacity=4)
    with Child(ctx_name, children.produce_filled, tx, 20, (256, 256)):
        tx.close()
        messages = get_until_closed(rx)
    assert [m["i"] for m in messages] == list(range(20))
    held = [(m["array"], m["tensor"][1:]) for m in messages]
    del messages
    gc.collect()
    assert used(rx) > 0
    for i, (array, tensor_view) in enumerate(held):
        assert np.all(array == i), f"message {i}: array changed after its message was dropped"
        assert torch.all(tensor_view == i), f"message {i}: tensor changed"
    del array, tensor_view, held
    assert used(rx) == 0
    rx.close()


DERIVATIONS = {
    "numpy_slice": lambda m: m["array"][1:],
    "numpy_transpose": lambda m: m["array"].T,
    "numpy_reshape": lambda m: m["array"].reshape(-1),
    "numpy_column": lambda m: m["array"][:, 0],
    "torch_as_tensor_of_array": lambda m: torch.as_tensor(m["array"]),
    "torch_from_numpy": lambda m: torch.from_numpy(m["array"]),
    "torch_slice": lambda m: m["tensor"][1:],
    "torch_view": lambda m: m["tensor"].view(-1),
    "torch_numpy": lambda m: m["tensor"].numpy(),
    "numpy_asarray_of_tensor": lambda m: np.asarray(m["tensor"]),
    "memoryview": lambda m: memoryview(m["array"]),
}


@pytest.mark.parametrize("derive", list(DERIVATIONS))
def test_derived_view_keeps_the_message_alive(derive):
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(
            {"array": np.full((64, 64), 7.0), "tensor": torch.full((64, 64), 7.0)},
            timeout=10,
        )
        message = rx.get(timeout=10)
        view = DERIVATIONS[derive](message)
        del message
        assert used(rx) > 0, "memory released while a derived view is alive"
        assert np.all(np.asarray(view) == 7.0)
        del view
        assert used(rx) == 0, "memory not released after the last view died"


def test_release_waits_for_every_view_of_a_message():
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"a": np.ones(1000), "b": torch.ones(1000), "n": 3}, timeout=10)
        assert used(tx) > 0
        message = rx.get(timeout=10)
        a, b = message["a"], message["b"]
        del message
        assert used(rx) > 0
        del a
        assert used(rx) > 0, "released while the message's tensor is alive"
        del b
        assert used(rx) == 0


def test_message_without_arrays_is_released_on_receipt():
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"n": 1, "s": "text", "l": [1, 2, 3]}, timeout=10)
        got = rx.get(timeout=10)
        assert got == {"n": 1, "s": "text", "l": [1, 2, 3]}
        assert used(rx) == 0, "a message with no views must not hold slab memory"


def test_get_copy_releases_at_once():
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"a": np.arange(1000.0), "t": torch.arange(1000.0), "b": b"x" * 100_000}, timeout=10)
        got = rx.get(timeout=10, copy=True)
        assert used(rx) == 0, "get(copy=True) must not keep slab memory"
        assert np.array_equal(got["a"], np.arange(1000.0)) and got["a"].flags.writeable
        assert torch.equal(got["t"], torch.arange(1000.0))
        assert got["b"] == b"x" * 100_000


@pytest.mark.timeout(600)
def test_ten_thousand_8mib_messages_through_a_64mib_slab():
    """The slab is recycled: it never maps more than max_slab_bytes, however many pass."""
    count, nbytes, limit = 10_000, 8 * MiB, 64 * MiB
    tx, rx = tensorslab.channel(max_slab_bytes=limit)
    assert rx.stats()["max_slab_bytes"] == limit
    largest_mapped = 0
    with Child("spawn", children.produce_stamped, tx, count, nbytes, timeout=600):
        tx.close()
        pattern = (np.arange(1, 4096, dtype=np.uint64) % 251).astype(np.uint8)
        for i in range(count):
            message = rx.get(timeout=60)
            data = message["data"]
            assert message["i"] == i and data.shape == (nbytes,)
            assert data[0] == data[-1] == i % 256, f"message {i} corrupt"
            if i % 500 == 0:
                assert np.array_equal(data[1:4096], pattern), f"message {i} corrupt"
                largest_mapped = max(largest_mapped, rx.stats()["slab_mapped_bytes"])
            del message, data
        with pytest.raises(tensorslab.Closed):
            rx.get(timeout=60)
    stats = rx.stats()
    assert max(largest_mapped, stats["slab_mapped_bytes"]) <= limit
    assert stats["messages_received"] == count
    assert stats["bytes_received"] >= count * nbytes
    assert used(rx) == 0
    rx.close()


def test_wait_for_all_ack():
    tx, rx = tensorslab.channel()
    with tx, rx:
        assert tx.wait_for_all_ack(timeout=0) is True  # nothing sent yet
        for i in range(3):
            tx.put({"i": i, "a": np.full(100, i)}, timeout=10)
        assert tx.wait_for_all_ack(timeout=0.1) is False  # nothing taken
        held = [rx.get(timeout=10) for _ in range(3)]
        assert tx.wait_for_all_ack(timeout=0.1) is False  # taken, views alive
        del held[:2]
        gc.collect()
        assert tx.wait_for_all_ack(timeout=0.1) is False  # one view still alive
        del held
        gc.collect()
        assert tx.wait_for_all_ack(timeout=10) is True


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_wait_for_all_ack_with_a_consumer_process(ctx_name):
    tx, rx = tensorslab.channel(capacity=8)
    with Child(ctx_name, children.consume_and_drop, rx) as child:
        rx.close()
        for i in range(50):
            tx.put({"i": i, "a": np.full(10_000, i)}, timeout=60)
        assert tx.wait_for_all_ack(timeout=60) is True
        assert tx.stats()["slab_used_bytes"] == 0
        tx.close()
        assert child.join() == 50


def test_stats_keys_and_counters():
    tx, rx = tensorslab.channel(capacity=8, max_slab_bytes=32 * MiB)
    with tx, rx:
        for handle in (tx, rx):
            stats = handle.stats()
            assert isinstance(stats, dict)
            missing = STATS_KEYS - stats.keys()
            assert not missing, f"stats() lacks {sorted(missing)}"
            assert stats["capacity"] == 8 and stats["max_slab_bytes"] == 32 * MiB
            assert stats["queued"] == stats["messages_in_flight"] == stats["slab_used_bytes"] == 0
        payload = np.zeros(1000, dtype=np.uint8)
        for _ in range(3):
            tx.put(payload, timeout=10)
        assert tx.stats()["queued"] == 3
        assert tx.stats()["messages_sent"] == 3
        assert tx.stats()["bytes_sent"] >= 3000
        assert tx.stats()["messages_in_flight"] >= 3
        assert 0 < tx.stats()["slab_used_bytes"] <= tx.stats()["slab_mapped_bytes"] <= 32 * MiB
        held = [rx.get(timeout=10) for _ in range(3)]
        stats = rx.stats()
        assert stats["queued"] == 0 and stats["messages_received"] == 3
        assert stats["bytes_received"] >= 3000
        assert stats["messages_in_flight"] >= 1
        del held
        gc.collect()
        stats = rx.stats()
        assert stats["messages_in_flight"] == 0 and stats["slab_used_bytes"] == 0
        for key in ("put_blocked_seconds", "get_blocked_seconds"):
            assert stats[key] >= 0
