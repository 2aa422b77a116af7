"""Tensors DLPack cannot export (sparse COO and CSR, quantized, nested) travel as
`torch.multiprocessing` would move them (pickled by torch's own reductions, the bytes in the
slab) instead of failing the put: a batch torch can move never becomes an error (issue 12,
item 0)."""

from __future__ import annotations

import warnings

import pytest
import torch

import children
import tensorslab
from helpers import Child


def odd_tensors() -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # beta / deprecated / prototype notices
        return {
            "sparse_coo": torch.tensor([[0, 1.5], [2, 0]]).to_sparse(),
            "sparse_csr": torch.tensor([[0, 1.5], [2, 0]]).to_sparse_csr(),
            "quantized": torch.quantize_per_tensor(torch.tensor([1.0, 2.0]), 0.1, 0, torch.quint8),
            "nested": torch.nested.nested_tensor([torch.ones(2), torch.arange(3.0)]),
        }


def same(got: torch.Tensor, sent: torch.Tensor) -> bool:
    if got.layout != sent.layout or got.dtype != sent.dtype:
        return False
    if sent.is_nested:
        return all(torch.equal(a, b) for a, b in zip(got.unbind(), sent.unbind(), strict=True))
    if sent.is_quantized:
        return torch.equal(got.dequantize(), sent.dequantize())
    return torch.equal(got.to_dense(), sent.to_dense())


@pytest.mark.parametrize("name", list(odd_tensors()))
def test_a_tensor_dlpack_refuses_travels_through_the_slab(name):
    sent = odd_tensors()[name]
    tx, rx = tensorslab.channel()
    with tx, rx, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        tx.put({"t": sent, "dense": torch.arange(4)}, timeout=10)
        got = rx.get(timeout=10)
        assert same(got["t"], sent)
        assert torch.equal(got["dense"], torch.arange(4))


def test_strict_channels_still_refuse_them_naming_the_path():
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx, pytest.raises(tensorslab.EncodeError, match=r"msg\['t'\]"):
        tx.put({"t": odd_tensors()["sparse_coo"]}, timeout=10)


def test_a_sparse_tensor_reaches_a_spawned_process_through_a_queue():
    q = tensorslab.Queue()
    q.put(odd_tensors()["sparse_coo"], timeout=10)
    got = Child("spawn", children.get_from_queue, q).start().join()
    assert same(got, odd_tensors()["sparse_coo"])
    q.close()


class OddDataset(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(index), **odd_tensors()}


def keep_list(batch: list) -> list:
    return batch


def test_a_dataloader_worker_sends_them_as_torch_does():
    """Torch's own loader moves these batches; ours must not turn them into worker errors."""
    from tensorslab.torch import DataLoader

    loader = DataLoader(
        OddDataset(),
        batch_size=2,
        num_workers=1,
        collate_fn=keep_list,
        multiprocessing_context="fork",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        batches = list(loader)
    assert [item["index"].item() for batch in batches for item in batch] == [0, 1, 2, 3]
    expected = odd_tensors()
    for batch in batches:
        for item in batch:
            assert all(same(item[name], tensor) for name, tensor in expected.items())
