"""Train a small CNN on synthetic images with torch's DataLoader, then with tensorslab's.

    python examples/dataloader_workers.py            # 60 steps per loader
    python examples/dataloader_workers.py --smoke    # 4 steps per loader (CI)

The only change between the two runs is the DataLoader class: tensorslab.torch.DataLoader
takes the same arguments, yields the same batches for the same seed (so the two runs print
the same losses), and moves each batch from the worker to the trainer through a slab of
shared memory instead of a fresh segment per batch. Steps/s and batches/s are printed for
each; with a model this small, the loader's transport is a large share of a step.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader as TorchDataLoader
from torch.utils.data import Dataset

from tensorslab.torch import DataLoader as SlabDataLoader


class SyntheticImages(Dataset):
    """Deterministic random images (float32[3, size, size]) with a label each."""

    def __init__(self, length: int, size: int = 96, classes: int = 10):
        self.length, self.size, self.classes = length, size, classes

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        generator = torch.Generator().manual_seed(index)
        image = torch.rand(3, self.size, self.size, generator=generator)
        return {"image": image, "label": index % self.classes, "id": f"img-{index:05d}"}


def make_model(classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 5, stride=4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, classes),
    )


def train(loader_class, steps: int, batch_size: int, workers: int) -> tuple[list[float], float]:
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = loader_class(
        SyntheticImages(steps * batch_size),
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        generator=torch.Generator().manual_seed(1),
    )
    losses, start = [], None
    for step, batch in enumerate(loader):
        if step == 1:
            start = time.perf_counter()  # from the second batch: workers' start-up not counted
        loss = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - start if start is not None else float("nan")
    return losses, (len(losses) - 1) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="4 steps per loader")
    parser.add_argument("--steps", type=int, help="steps per loader (default 60, 4 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    steps = args.steps or (4 if args.smoke else 60)
    torch.set_num_threads(1)  # leave the cores to the workers

    results = {}
    for name, cls in (("torch", TorchDataLoader), ("tensorslab", SlabDataLoader)):
        losses, rate = train(cls, steps, args.batch_size, args.workers)
        results[name] = losses
        print(f"{name:>10}: {rate:6.1f} batches/s (= steps/s), final loss {losses[-1]:.4f}")
    if results["torch"] != results["tensorslab"]:
        print("losses differ between the loaders: batches were not the same", file=sys.stderr)
        return 1
    print("same losses at every step: both loaders produced the same batches")
    return 0


if __name__ == "__main__":
    sys.exit(main())
