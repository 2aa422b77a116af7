"""torch tensors: dtypes, grads, Parameters, layouts, state_dicts and `alloc`."""

from __future__ import annotations

import collections
import gc
import warnings

import pytest
import torch

import samples
import tensorslab
from helpers import echo_through_child
from samples import assert_same

TENSORS = samples.tensor_samples()


@pytest.mark.parametrize("name", list(TENSORS))
def test_dumps_loads(name):
    assert_same(tensorslab.loads(tensorslab.dumps(TENSORS[name])), TENSORS[name])


@pytest.mark.parametrize("name", list(TENSORS))
def test_channel_in_process_writable_without_warnings(name):
    value = TENSORS[name]
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put({"t": value}, timeout=10)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's "non-writable NumPy array" warning
            got = rx.get(timeout=10)["t"]
            assert_same(got, value)
            before = value.detach().clone()
            if got.numel() and 0 not in got.stride():
                with torch.no_grad():
                    got.zero_()
                assert not got.detach().any(), "in-place write into a received tensor failed"
                assert_same(value.detach(), before)  # the source is untouched


def test_parameter_stays_parameter():
    layer = torch.nn.Linear(3, 2)
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"weight": layer.weight, "frozen": layer.bias.detach()}, timeout=10)
        got = rx.get(timeout=10)
    assert type(got["weight"]) is torch.nn.Parameter and got["weight"].requires_grad
    assert type(got["frozen"]) is torch.Tensor and not got["frozen"].requires_grad
    assert torch.equal(got["weight"].detach(), layer.weight.detach())


def test_received_tensor_takes_part_in_autograd():
    source = torch.arange(6.0).reshape(2, 3).requires_grad_()
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(source, timeout=10)
        got = rx.get(timeout=10)
        assert got.requires_grad and got.is_leaf
        (got * got).sum().backward()
        assert torch.equal(got.grad, 2 * source.detach())
        del got
        gc.collect()


def test_state_dict():
    state = samples.state_dict_sample()
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put(state, timeout=10)
        got = rx.get(timeout=10)
        assert type(got) is collections.OrderedDict
        assert_same(got, state)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
        )
        model.load_state_dict(got)
        assert torch.equal(model[0].weight.detach(), state["0.weight"])


def test_same_tensor_twice_arrives_as_one_object():
    tensor = torch.arange(10.0)
    message = {"a": tensor, "b": [tensor], "c": tensor[2:]}
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(message, timeout=10)
        got = rx.get(timeout=10)
    assert got["a"] is got["b"][0]
    assert got["c"] is not got["a"]
    assert_same(got, message)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_alloc_tensor(dtype):
    tx, rx = tensorslab.channel()
    with tx, rx:
        tensor = tx.alloc((4, 5), dtype)
        assert type(tensor) is torch.Tensor
        assert tensor.shape == (4, 5) and tensor.dtype == dtype and tensor.is_contiguous()
        tensor.copy_(torch.arange(20).reshape(4, 5).to(dtype))
        expected = tensor.clone()
        tx.put({"inside": [tensor]}, timeout=10)
        assert_same(rx.get(timeout=10)["inside"][0], expected)


def test_alloc_tensor_not_sent_is_freed():
    tx, rx = tensorslab.channel()
    with tx, rx:
        tensor = tx.alloc((1 << 18,), torch.float32)
        assert tx.stats()["slab_used_bytes"] >= 1 << 20
        del tensor
        gc.collect()
        assert tx.stats()["slab_used_bytes"] == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_refused_with_hint():
    tx, rx = tensorslab.channel()
    with tx, rx:
        with pytest.raises(TypeError, match=r"\.cpu\(\)"):
            tx.put({"x": torch.ones(3, device="cuda")}, timeout=10)
        assert tx.stats()["slab_used_bytes"] == 0
        tx.put(1, timeout=10)
        assert rx.get(timeout=10) == 1


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_tensors_through_child(ctx_name):
    echo_through_child(ctx_name, "tensors", samples.tensor_samples())
