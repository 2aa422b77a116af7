"""torch's DataLoader against tensorslab.torch.DataLoader, side by side in one run.

    python benches/dataloader.py            # the full run (a few minutes)
    python benches/dataloader.py --smoke    # a few batches per case (CI)

Transport-bound datasets: each item is a ready-made tensor (a few distinct tensors reused,
no decoding), so a worker's time goes into collating the batch and handing it over. Cases:
``image`` (float32[3,224,224] items, batch 64: 36.75 MiB batches, the issue's target),
``16MiB`` (float32[4,1024,1024] items, batch 4) and ``8KiB`` (float32[2048] items, batch
64, where per-batch overhead dominates). ``num_workers=2``, the default start method.

The training loop reads every byte of each batch (``batch.sum()``), as a step that copies
it to a device would, and drops it. Each round creates a loader, skips ``warmup`` batches
(worker start-up), then times ``batches``; loaders alternate round by round and the median
round is reported, with the ratio ours/torch. Peak shared memory is the most that the main
process and its workers held at once (segments mapped or held by descriptor, each counted
once; sampled every 10 ms in a thread of the main process, for both loaders), and for ours
also the slab's mapped bytes as the channel reports them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time

import torch
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset

import tensorslab
from tensorslab.torch import DataLoader as SlabDataLoader

MiB = 1 << 20
CASES = {
    # name: (item shape, batch size, measured batches, measured batches with --smoke)
    "image": ((3, 224, 224), 64, 60, 4),
    "16MiB": ((4, 1024, 1024), 4, 60, 4),
    "8KiB": ((2048,), 64, 1500, 20),
}
WARMUP_BATCHES = 4


class ReadyMadeDataset(Dataset):
    """``length`` items, each one of ``distinct`` ready-made float32 tensors."""

    def __init__(self, shape: tuple[int, ...], length: int, distinct: int = 4):
        self.items = [torch.full(shape, float(i)) for i in range(distinct)]
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index % len(self.items)]


SHARED_MEMORY_MARKS = ("/dev/shm/", "memfd:")


def shared_segments(pid: int) -> dict[int, int]:
    """Shared-memory segments (inode -> bytes) that ``pid`` maps or holds a descriptor of:
    torch's (``/dev/shm/torch_*``, unlinked) and tensorslab's (``memfd:tensorslab-*``)."""
    found: dict[int, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as maps:
            for line in maps:
                if any(mark in line for mark in SHARED_MEMORY_MARKS):
                    fields = line.split()
                    start, end = (int(part, 16) for part in fields[0].split("-"))
                    inode, extent = int(fields[4]), int(fields[2], 16) + end - start
                    found[inode] = max(found.get(inode, 0), extent)
        for fd in os.listdir(f"/proc/{pid}/fd"):
            path = f"/proc/{pid}/fd/{fd}"
            try:
                if any(mark in os.readlink(path) for mark in SHARED_MEMORY_MARKS):
                    info = os.stat(path)
                    found[info.st_ino] = max(found.get(info.st_ino, 0), info.st_size)
            except OSError:
                continue
    except OSError:
        pass
    return found


class SharedMemoryPeak:
    """Peak of the shared memory held by this process and its DataLoader workers (segments
    mapped or held by descriptor, each counted once), sampled in a thread."""

    def __init__(self, interval: float = 0.01):
        self.interval, self.peak = interval, 0
        self.worker_pids: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            segments: dict[int, int] = {}
            for pid in [os.getpid(), *self.worker_pids]:
                segments.update(shared_segments(pid))
            self.peak = max(self.peak, sum(segments.values()))
            time.sleep(self.interval)

    def __enter__(self) -> SharedMemoryPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_round(loader_class, shape, batch_size: int, batches: int, workers: int) -> dict:
    dataset = ReadyMadeDataset(shape, (WARMUP_BATCHES + batches) * batch_size)
    loader = loader_class(dataset, batch_size=batch_size, num_workers=workers)
    slab_peak = 0
    with SharedMemoryPeak() as shm:
        iterator = iter(loader)
        shm.worker_pids = [worker.pid for worker in iterator._workers]
        checksum = 0.0
        for i, batch in enumerate(iterator):
            if i == WARMUP_BATCHES:
                start = time.perf_counter()
            checksum += float(batch.sum())  # reads every byte, like a copy to a device
            if loader_class is SlabDataLoader:
                stats = iterator._worker_result_queue._rx.stats()
                slab_peak = max(slab_peak, stats["slab_mapped_bytes"])
            del batch
        elapsed = time.perf_counter() - start
        del iterator
    assert checksum > 0
    return {"batches_s": batches / elapsed, "shm_peak": shm.peak, "slab_peak": slab_peak}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few batches per case")
    parser.add_argument("--rounds", type=int, help="rounds per loader (default 3, 1 smoke)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.smoke else 3)

    print(f"command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({len(os.sched_getaffinity(0))} usable), load average {os.getloadavg()[0]:.1f}, "
        f"Linux {platform.release()}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, tensorslab {tensorslab.__version__}, "
        f"start method {torch.multiprocessing.get_start_method()}, "
        f"sharing strategy {torch.multiprocessing.get_sharing_strategy()}"
    )
    print(f"num_workers={args.workers}, {rounds} round(s) per loader, median round reported")
    header = f"{'case':>6} {'batch':>10} {'loader':>10} {'batches/s':>10} {'GiB/s':>7} "
    print(header + f"{'peak shm':>11} {'slab peak':>10} {'ratio':>7}")
    for name in args.cases:
        shape, batch_size, batches, smoke_batches = CASES[name]
        batches = smoke_batches if args.smoke else batches
        batch_bytes = batch_size * torch.Size(shape).numel() * 4
        results: dict[str, list[dict]] = {"torch": [], "tensorslab": []}
        for _ in range(rounds):
            for label, cls in (("torch", TorchDataLoader), ("tensorslab", SlabDataLoader)):
                results[label].append(run_round(cls, shape, batch_size, batches, args.workers))
        medians = {}
        for label, rows in results.items():
            rate = statistics.median(row["batches_s"] for row in rows)
            medians[label] = rate
            shm_peak = max(row["shm_peak"] for row in rows)
            slab = max(row["slab_peak"] for row in rows)
            ratio = f"{rate / medians['torch']:.2f}x" if label == "tensorslab" else ""
            print(
                f"{name:>6} {batch_bytes / MiB:>6.2f} MiB {label:>10} {rate:>10.1f} "
                f"{rate * batch_bytes / 2**30:>7.2f} {shm_peak / MiB:>7.0f} MiB "
                f"{(f'{slab / MiB:.0f} MiB' if slab else '-'):>10} {ratio:>7}",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
