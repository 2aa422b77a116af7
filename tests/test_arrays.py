"""NumPy arrays: every numeric dtype and awkward layout arrives equal and writable."""

from __future__ import annotations

import gc

import numpy as np
import pytest

import samples
import tensorslab
from helpers import echo_through_child
from samples import PICKLED_ARRAYS, assert_same

ARRAYS = samples.array_samples()
# Extended precision has no DLPack type code; whether it is native or pickled is the
# library's choice, so strict mode makes no promise about it.
NO_DLPACK = frozenset({"longdouble", "clongdouble"})
STRICT = [name for name in ARRAYS if name not in PICKLED_ARRAYS | NO_DLPACK]


@pytest.mark.parametrize("name", list(ARRAYS))
def test_dumps_loads(name):
    value = ARRAYS[name]
    allow_pickle = name in PICKLED_ARRAYS | NO_DLPACK
    assert_same(tensorslab.loads(tensorslab.dumps(value), allow_pickle=allow_pickle), value)


@pytest.mark.parametrize("name", list(ARRAYS))
def test_channel_in_process(name):
    value = ARRAYS[name]
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"x": value}, timeout=10)
        got = rx.get(timeout=10)["x"]
        assert_same(got, value)
        assert got.flags.writeable, "received arrays must be writable"
        if got.size and got.dtype.kind not in "OV":
            before = value.copy()
            got[...] = got.flat[-1]  # writing the received array never touches the source
            assert_same(value, before)


@pytest.mark.parametrize("name", STRICT)
def test_strict_channel_sends_arrays_natively(name):
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put(ARRAYS[name], timeout=10)
        assert_same(rx.get(timeout=10), ARRAYS[name])


def test_same_array_twice_arrives_as_one_object():
    array = np.arange(12.0).reshape(3, 4)
    message = {"a": array, "b": array, "both": [array, (array,)], "other": array[1:]}
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(message, timeout=10)
        got = rx.get(timeout=10)
    assert got["a"] is got["b"] is got["both"][0] is got["both"][1][0]
    assert got["other"] is not got["a"]
    assert_same(got, message)
    loaded = tensorslab.loads(tensorslab.dumps(message))
    assert loaded["a"] is loaded["b"] is loaded["both"][0]


def test_other_dlpack_exporters_arrive_as_ndarray():
    source = np.arange(10, dtype=np.int32)
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put({"v": samples.DLPackOnly(source)}, timeout=10)
        assert_same(rx.get(timeout=10)["v"], source)


@pytest.mark.parametrize("dtype", [np.dtype("float32"), np.int16, np.dtype("complex128")])
def test_alloc_ndarray(dtype):
    tx, rx = tensorslab.channel()
    with tx, rx:
        array = tx.alloc((3, 5), dtype)
        assert type(array) is np.ndarray
        assert array.shape == (3, 5) and array.dtype == np.dtype(dtype)
        assert array.flags.writeable and array.flags.c_contiguous
        array[...] = np.arange(15).reshape(3, 5)
        expected = array.copy()
        tx.put({"filled": array, "n": 1}, timeout=10)
        got = rx.get(timeout=10)
        assert_same(got["filled"], expected)
        del array, got


def test_alloc_not_sent_is_freed():
    tx, rx = tensorslab.channel()
    with tx, rx:
        array = tx.alloc((1 << 20,), np.dtype("uint8"))
        assert tx.stats()["slab_used_bytes"] >= 1 << 20
        del array
        gc.collect()
        assert tx.stats()["slab_used_bytes"] == 0


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_arrays_through_child(ctx_name):
    echo_through_child(ctx_name, "arrays", samples.array_samples())
