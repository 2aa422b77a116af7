"""tensorslab.torch.DataLoader against torch's own DataLoader, side by side.

Every comparison builds both loaders with the same arguments and seed and asserts the same
batches bit for bit (so the same sampler use, per-worker seeds, ``get_worker_info()`` and
``IterableDataset`` sharding), then the failure behaviours (worker error, killed worker,
timeout, early break, interpreter exit), the slab fast path and the full-slab fallback.
Datasets are tiny; ``fork`` carries most cases because a ``spawn`` worker imports torch
(seconds on a loaded machine), and ``spawn`` covers the pickled-handle path.
"""

from __future__ import annotations

import collections
import gc
import inspect
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset, IterableDataset, get_worker_info

import tensorslab
import tensorslab.torch as slab_torch
from tensorslab.testing import leaked_segments
from tensorslab.torch import DataLoader, SlabFallbackWarning

Point = collections.namedtuple("Point", ["x", "y"])

# Four workers on a two-core machine: torch warns, and that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create")


# -- datasets (module level: spawn workers import them) --------------------------------------


class RandomMapDataset(Dataset):
    """Samples that depend on the index, the worker's torch/numpy seeds and its id."""

    def __init__(self, length: int = 24, shape: tuple[int, ...] = (3, 4)):
        self.length, self.shape = length, shape

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        info = get_worker_info()
        return {
            "x": torch.rand(self.shape) + index,
            "noise": np.random.rand(2).astype(np.float32),
            "index": index,
            "worker": -1 if info is None else info.id,
            "seed": -1 if info is None else info.seed,
        }


class NestedDataset(Dataset):
    def __len__(self):
        return 10

    def __getitem__(self, index):
        return {
            "image": torch.full((2, 3), index, dtype=torch.uint8),
            "label": index % 3,
            "weight": index / 7,
            "name": f"sample-{index}",
            "pair": (torch.arange(3, dtype=torch.int64) * index, np.float64(index) / 3),
            "point": Point(x=np.arange(4, dtype=np.int16) + index, y=torch.tensor(index > 4)),
            "list": [torch.tensor([index, -index], dtype=torch.bfloat16), index],
            "half": torch.ones(1, dtype=torch.float16) * index,
        }


class ShardedIterable(IterableDataset):
    """Each worker yields its own share, as torch's documentation shows."""

    def __init__(self, end: int = 19):
        self.end = end

    def __len__(self):
        return self.end

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        for i in range(worker, self.end, workers):
            yield {"value": torch.tensor([i, i * i]), "rand": torch.rand(2), "worker": worker}


class FailingDataset(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        if index == 9:
            raise ValueError(f"sample {index} is broken")
        return torch.tensor([index])


class SlowDataset(Dataset):
    """Index ``slow_from`` and later take ``seconds`` each."""

    def __init__(self, slow_from: int, seconds: float, length: int = 16):
        self.slow_from, self.seconds, self.length = slow_from, seconds, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        if index >= self.slow_from:
            time.sleep(self.seconds)
        return torch.tensor([index])


class MebibyteDataset(Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        return torch.full((256, 1024), float(index))  # 1 MiB of float32


class NumpyDataset(Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, index):
        return np.full((2, 2), index, dtype=np.int32), f"s{index}"


def concat_collate(batch):
    """A custom collate_fn: its output is copied into the slab once, by put."""
    return torch.cat([sample["x"].flatten() for sample in batch]), [s["index"] for s in batch]


class Unpicklable:
    def __reduce__(self):
        raise TypeError("this object refuses to be pickled")


def unpicklable_collate(batch):
    return Unpicklable()


# -- helpers ----------------------------------------------------------------------------------


def assert_same(got, expected, path="batch"):
    """Same structure, types, dtypes, shapes and bits."""
    assert type(got) is type(expected), f"{path}: {type(got)} != {type(expected)}"
    if isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert torch.equal(got, expected), f"{path}: values differ"
    elif isinstance(expected, np.ndarray):
        assert got.dtype == expected.dtype and np.array_equal(got, expected), path
    elif isinstance(expected, dict):
        assert list(got) == list(expected), f"{path}: keys {list(got)} != {list(expected)}"
        for key in expected:
            assert_same(got[key], expected[key], f"{path}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), f"{path}: length {len(got)} != {len(expected)}"
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_same(g, e, f"{path}[{i}]")
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"


def run_both(dataset_factory, *, epochs=1, seed=0, **kwargs):
    """The batches of ``epochs`` epochs from torch's loader and from ours, same seed."""
    results = []
    for cls in (TorchDataLoader, DataLoader):
        generator = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)  # the base seed when no generator is used
        np.random.seed(seed)  # what samples draw with num_workers=0
        loader = cls(dataset_factory(), generator=generator, **kwargs)
        results.append([list(loader) for _ in range(epochs)])
        del loader
    return results


def slab_ranges():
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "memfd:tensorslab-" in line:
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def in_slab(tensor: torch.Tensor) -> bool:
    address = tensor.data_ptr()
    return any(start <= address < end for start, end in slab_ranges())


def wait_until_gone(pids, timeout=20.0):
    """Pids still running (not zombies) after ``timeout``."""
    deadline = time.monotonic() + timeout
    alive = list(pids)
    while alive and time.monotonic() < deadline:
        alive = [pid for pid in alive if _running(pid)]
        if alive:
            time.sleep(0.05)
    return alive


def _running(pid):
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except OSError:
        return False


# -- same results as torch ----------------------------------------------------------------


def test_is_a_torch_dataloader_with_torch_signature():
    loader = DataLoader(RandomMapDataset(), batch_size=4)
    assert isinstance(loader, TorchDataLoader)
    ours = inspect.signature(DataLoader)
    theirs = inspect.signature(TorchDataLoader)
    assert list(ours.parameters)[: len(theirs.parameters)] == list(theirs.parameters)
    assert {"max_slab_bytes", "slab_bytes"} <= set(ours.parameters)


# persistent_workers needs workers, so (0, True) is not a case.
@pytest.mark.parametrize(
    "num_workers,persistent",
    [(0, False), (1, False), (2, False), (4, False), (1, True), (2, True), (4, True)],
)
def test_map_style_same_batches_fork(num_workers, persistent):
    kwargs = dict(
        batch_size=5, shuffle=True, num_workers=num_workers, persistent_workers=persistent
    )
    if num_workers:
        kwargs["multiprocessing_context"] = "fork"
    theirs, ours = run_both(RandomMapDataset, epochs=2, **kwargs)
    assert_same(ours, theirs)
    assert len(ours[0]) == len(DataLoader(RandomMapDataset(), batch_size=5)) == 5


def test_map_style_same_batches_spawn_persistent():
    theirs, ours = run_both(
        RandomMapDataset,
        epochs=2,
        batch_size=6,
        shuffle=True,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="spawn",
        drop_last=True,
    )
    assert_same(ours, theirs)


@pytest.mark.parametrize("num_workers", [0, 1, 2, 4])
def test_iterable_same_batches_and_sharding(num_workers):
    kwargs = dict(batch_size=3, num_workers=num_workers)
    if num_workers:
        kwargs["multiprocessing_context"] = "fork"
    theirs, ours = run_both(ShardedIterable, **kwargs)
    assert_same(ours, theirs)
    values = sorted(int(v) for batch in ours[0] for v in batch["value"][:, 0])
    assert values == list(range(19))  # each sample exactly once across workers
    assert len(DataLoader(ShardedIterable(), **kwargs)) == len(
        TorchDataLoader(ShardedIterable(), **kwargs)
    )


def test_iterable_dataset_spawn():
    theirs, ours = run_both(
        ShardedIterable, batch_size=4, num_workers=2, multiprocessing_context="spawn"
    )
    assert_same(ours, theirs)


def test_nested_structures():
    theirs, ours = run_both(
        NestedDataset, batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    assert_same(ours, theirs)
    batch = ours[0][0]
    assert isinstance(batch["point"], Point) and batch["name"][0] == "sample-0"


def test_custom_collate():
    theirs, ours = run_both(
        RandomMapDataset,
        batch_size=4,
        num_workers=2,
        collate_fn=concat_collate,
        multiprocessing_context="fork",
    )
    assert_same(ours, theirs)


def test_no_auto_batching_default_convert():
    theirs, ours = run_both(
        NumpyDataset, batch_size=None, num_workers=2, multiprocessing_context="fork"
    )
    assert_same(ours, theirs)
    assert isinstance(ours[0][0][0], torch.Tensor)  # default_convert made tensors of arrays


def test_sampler_and_batch_sampler_and_prefetch():
    theirs, ours = run_both(
        RandomMapDataset,
        batch_sampler=[[3, 1], [0], [7, 8, 9], [2, 2]],
        num_workers=2,
        prefetch_factor=1,
        multiprocessing_context="fork",
    )
    assert_same(ours, theirs)


def test_worker_init_fn_and_in_order_false():
    # Out of order, which worker loads which batch depends on timing (in torch too), so
    # only the indices are compared; `x` must still belong to its index.
    theirs, ours = run_both(
        RandomMapDataset,
        batch_size=2,
        num_workers=2,
        in_order=False,
        worker_init_fn=np.random.seed,
        multiprocessing_context="fork",
    )

    def indices(batches):
        return sorted(batch["index"].tolist() for batch in batches)

    assert indices(ours[0]) == indices(theirs[0])
    for batch in ours[0]:
        assert torch.equal(batch["x"].floor()[:, 0, 0], batch["index"].float())


def test_pin_memory_without_accelerator_warns_like_torch():
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning really happens")
    with pytest.warns(UserWarning, match="pin_memory"):
        theirs, ours = run_both(
            RandomMapDataset,
            batch_size=4,
            num_workers=1,
            pin_memory=True,
            multiprocessing_context="fork",
        )
    assert_same(ours, theirs)


# -- the transport ----------------------------------------------------------------------------


def test_result_queue_is_the_slab_queue():
    # Guards the assumption that torch creates the result queue with the context's first
    # Queue() call: a torch upgrade that changes it must fail here.
    loader = DataLoader(
        RandomMapDataset(), batch_size=4, num_workers=2, multiprocessing_context="fork"
    )
    iterator = iter(loader)
    assert isinstance(iterator._worker_result_queue, tensorslab.Queue)
    assert not any(isinstance(q, tensorslab.Queue) for q in iterator._index_queues)
    assert isinstance(iterator._collate_fn, slab_torch._SlabCollate)
    next(iterator)
    del iterator


def test_torch_reordering_its_queues_fails_loudly(monkeypatch):
    original = slab_torch._ContextWithResultQueue.Queue

    def index_queue_first(self, *args, **kwargs):
        if not getattr(self, "_skipped", False):
            self._skipped = True
            return self._context.Queue()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(slab_torch._ContextWithResultQueue, "Queue", index_queue_first)
    loader = DataLoader(
        RandomMapDataset(), batch_size=4, num_workers=1, multiprocessing_context="fork"
    )
    with pytest.raises(RuntimeError, match="first multiprocessing_context.Queue"):
        iter(loader)


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_default_collate_batches_live_in_the_slab(ctx):
    loader = DataLoader(
        RandomMapDataset(length=8), batch_size=4, num_workers=2, multiprocessing_context=ctx
    )
    batches = list(loader)
    assert all(in_slab(batch["x"]) and in_slab(batch["noise"]) for batch in batches)
    # A custom collate's output is copied into the slab by put: received in the slab too.
    custom = list(
        DataLoader(
            RandomMapDataset(length=8),
            batch_size=4,
            num_workers=1,
            collate_fn=concat_collate,
            multiprocessing_context="fork",
        )
    )
    assert all(in_slab(flat) for flat, _ in custom)
    # torch's own loader does not use it.
    plain = next(
        iter(
            TorchDataLoader(
                RandomMapDataset(length=8),
                batch_size=4,
                num_workers=1,
                multiprocessing_context="fork",
            )
        )
    )
    assert not in_slab(plain["x"])


def test_released_batches_return_to_the_slab():
    loader = DataLoader(
        MebibyteDataset(),
        batch_size=2,
        num_workers=2,
        multiprocessing_context="fork",
        max_slab_bytes=32 << 20,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SlabFallbackWarning)  # never needed: batches are dropped
        for _epoch in range(2):
            for i, batch in enumerate(loader):
                assert torch.all(batch[:, 0, 0] == torch.tensor([2.0 * i, 2.0 * i + 1]))
                assert in_slab(batch)


def test_kept_batches_fall_back_to_torch_transport_and_warn_once(monkeypatch):
    monkeypatch.setattr(slab_torch, "SLAB_WAIT_SECONDS", 0.2)
    kwargs = dict(batch_size=2, num_workers=2, multiprocessing_context="fork")
    expected = list(TorchDataLoader(MebibyteDataset(), **kwargs))
    loader = DataLoader(MebibyteDataset(), max_slab_bytes=8 << 20, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kept = list(loader)  # all 12 MiB kept alive: more than the 8 MiB slab
    assert_same(kept, expected)
    fallback = [w for w in caught if issubclass(w.category, SlabFallbackWarning)]
    assert len(fallback) == 1, [str(w.message) for w in caught]
    message = str(fallback[0].message)
    assert "slab" in message and "max_slab_bytes" in message
    assert any(not in_slab(batch) for batch in kept) and any(in_slab(batch) for batch in kept)


def big_array_collate(batch):
    return np.stack([sample.numpy() for sample in batch])  # 2 MiB, not a tensor


def test_fallback_for_large_non_tensor_batches(monkeypatch):
    # A batch torch cannot share by descriptor (a NumPy array) still travels when the slab is
    # full: its pickle goes through torch shared memory, the message stays small.
    monkeypatch.setattr(slab_torch, "SLAB_WAIT_SECONDS", 0.2)
    kwargs = dict(
        batch_size=2, num_workers=1, multiprocessing_context="fork", collate_fn=big_array_collate
    )
    expected = list(TorchDataLoader(MebibyteDataset(), **kwargs))
    with pytest.warns(SlabFallbackWarning):
        kept = list(DataLoader(MebibyteDataset(), max_slab_bytes=6 << 20, **kwargs))
    assert_same(kept, expected)


def test_persistent_workers_reuse_workers_and_slab():
    loader = DataLoader(
        RandomMapDataset(),
        batch_size=4,
        num_workers=2,
        persistent_workers=True,
        multiprocessing_context="fork",
    )
    first = iter(loader)
    list(first)
    pids = [w.pid for w in first._workers]
    queue = first._worker_result_queue
    second = iter(loader)
    assert second is first and second._worker_result_queue is queue
    assert len(list(second)) == 6
    assert [w.pid for w in second._workers] == pids
    del first, second, queue, loader
    assert not wait_until_gone(pids)


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_worker_exception_reraised_with_traceback(ctx):
    # With fork, torch's loader runs too and the messages must match exactly (spawn costs
    # seconds per loader, so there only ours runs).
    messages = []
    for cls in (TorchDataLoader, DataLoader) if ctx == "fork" else (DataLoader,):
        loader = cls(FailingDataset(), batch_size=2, num_workers=2, multiprocessing_context=ctx)
        with pytest.raises(ValueError) as raised:
            for _ in loader:
                pass
        messages.append(str(raised.value))
        del raised, loader
    ours = messages[-1]
    assert "Caught ValueError in DataLoader worker process 0" in ours
    assert "Original Traceback" in ours and "sample 9 is broken" in ours
    assert "in __getitem__" in ours and "test_dataloader.py" in ours
    assert len(set(messages)) == 1, messages


def test_unsendable_batch_raises_instead_of_hanging():
    loader = DataLoader(
        RandomMapDataset(),
        batch_size=2,
        num_workers=1,
        collate_fn=unpicklable_collate,
        multiprocessing_context="fork",
        timeout=60,
    )
    with pytest.raises(TypeError, match="refuses to be pickled"):
        next(iter(loader))


@pytest.mark.parametrize("ctx", ["fork", "spawn"])
def test_killed_worker_raises_runtime_error_naming_pid(ctx):
    loader = DataLoader(
        SlowDataset(slow_from=4, seconds=30),
        batch_size=2,
        num_workers=2,
        multiprocessing_context=ctx,
    )
    iterator = iter(loader)
    next(iterator)
    victim = iterator._workers[1].pid
    os.kill(victim, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"DataLoader worker \(pid\(?s?\)? {victim}\)"):
        for _ in iterator:
            pass
    assert time.monotonic() - start < 30
    workers = [w.pid for w in iterator._workers]
    del iterator
    assert not wait_until_gone(workers)


def test_timeout():
    loader = DataLoader(
        SlowDataset(slow_from=2, seconds=3),
        batch_size=2,
        num_workers=1,
        timeout=0.5,
        multiprocessing_context="fork",
    )
    with pytest.raises(RuntimeError, match=r"DataLoader timed out after 0.5 seconds"):
        for _ in loader:
            pass


def test_early_break_and_del_shut_down_and_free_segments():
    before = set(leaked_segments())
    loader = DataLoader(
        RandomMapDataset(), batch_size=2, num_workers=2, multiprocessing_context="fork"
    )
    iterator = iter(loader)
    for i, _batch in enumerate(iterator):
        if i == 1:
            break
    pids = [w.pid for w in iterator._workers]
    del iterator, _batch
    gc.collect()
    assert not wait_until_gone(pids)
    assert set(leaked_segments()) <= before


EXIT_SCRIPT = textwrap.dedent(
    """
    import sys, torch
    sys.path.insert(0, {tests!r})
    from test_dataloader import RandomMapDataset
    from tensorslab.torch import DataLoader
    loader = DataLoader(RandomMapDataset(), batch_size=2, num_workers=2,
                        persistent_workers={persistent}, multiprocessing_context={ctx!r})
    iterator = iter(loader)
    # One batch from each worker (they take turns): both are up. A spawn worker still
    # importing torch when the interpreter exits misses torch's shutdown join and is
    # terminated, which torch's own SIGCHLD handler reports (stock torch does the same).
    next(iterator)
    next(iterator)
    print(" ".join(str(w.pid) for w in iterator._workers), flush=True)
    # exit with workers running, batches queued and the iterator alive
    """
)


@pytest.mark.parametrize("ctx,persistent", [("fork", False), ("fork", True), ("spawn", True)])
def test_interpreter_exit_with_live_workers(ctx, persistent):
    script = EXIT_SCRIPT.format(tests=os.path.dirname(__file__), persistent=persistent, ctx=ctx)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    assert not wait_until_gone(pids)


def test_the_loader_is_generic_as_torchs():
    """`DataLoader[List[Tensor]]` in an annotation evaluated at run time works with torch's
    loader, so it must with ours (a subclass that drops the type parameter raises
    TypeError: not a generic class)."""
    from typing import List

    assert torch.utils.data.DataLoader[List[torch.Tensor]] is not None
    alias = tensorslab.torch.DataLoader[List[torch.Tensor]]
    assert alias.__origin__ is tensorslab.torch.DataLoader
