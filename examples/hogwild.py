"""Hogwild training: two processes update one model in shared memory, without locks.

    python examples/hogwild.py              # 2 workers, 400 steps each
    python examples/hogwild.py --smoke      # 150 steps each (CI)
    python examples/hogwild.py --steps 2000

As pytorch/examples' `mnist_hogwild`, on synthetic data: a teacher network labels random
points, and a small MLP learns them. `tensorslab.share(model)` (instead of
`model.share_memory()`) moves every parameter into one shared segment; the dataset is
shared the same way. Each worker, a spawn child of `tensorslab.multiprocessing` (imported
where `torch.multiprocessing` was), gets the model as a `Process` argument, maps the
segment once and runs SGD on it in place: every step of either worker is seen by the other
and by the parent, which never trains. The parent checks that the parameters moved and
that the loss went down, and exits 1 if not.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import tensorslab
import tensorslab.multiprocessing as mp  # was: import torch.multiprocessing as mp

FEATURES, CLASSES, POINTS = 16, 4, 4096


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden = torch.nn.Linear(FEATURES, 64)
        self.out = torch.nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(x)))


def synthetic_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random points labelled by a random teacher network."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(POINTS, FEATURES, generator=generator)
    teacher = torch.randn(FEATURES, CLASSES, generator=generator)
    return x, (torch.tanh(x) @ teacher).argmax(dim=1)


def shared_descriptors() -> int:
    """Descriptors of tensorslab segments this process holds: one per shared segment."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += "tensorslab-" in os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass  # the listdir's own descriptor, closed since
    return count


def train(rank: int, model: Net, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    torch.set_num_threads(1)  # two workers on a small machine: no thread oversubscription
    tensors = len(list(model.parameters())) + 2
    print(f"worker {rank}: {tensors} tensors in {shared_descriptors()} shared segments")
    torch.manual_seed(1 + rank)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    for _ in range(steps):
        batch = torch.randint(0, POINTS, (64,))
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()  # writes the shared parameters in place, lock-free (Hogwild)


def loss_of(model: Net, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, help="SGD steps per worker (400, 150 with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="150 steps per worker")
    args = parser.parse_args()
    args.steps = args.steps or (150 if args.smoke else 400)

    torch.manual_seed(0)
    model = tensorslab.share(Net())  # was: model.share_memory()
    x, y = synthetic_data()
    x, y = tensorslab.share(x), tensorslab.share(y)
    before = [p.detach().clone() for p in model.parameters()]
    # Where share put them. `import torch` registers torch.multiprocessing's reducers, which
    # would move a tensor that is not in shared memory yet into torch's own (changing its
    # address here) when it is passed to a child: staying put shows ours carried it.
    addresses = [p.data_ptr() for p in model.parameters()]
    initial = loss_of(model, x, y)

    ctx = mp.get_context("spawn")
    workers = [
        ctx.Process(target=train, args=(rank, model, x, y, args.steps))
        for rank in range(args.workers)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(300)
    failed = [w.name for w in workers if w.exitcode != 0]
    if failed:
        print(f"workers failed: {failed}", file=sys.stderr)
        return 1

    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    final = loss_of(model, x, y)
    print(
        f"{args.workers} workers x {args.steps} steps: loss {initial:.3f} -> {final:.3f}, "
        f"largest parameter change {moved:.3f} (seen by the parent, which never trained)"
    )
    if [p.data_ptr() for p in model.parameters()] != addresses:
        print("the parameters left the segment share put them in", file=sys.stderr)
        return 1
    if moved == 0.0:
        print("the shared parameters did not move: the workers trained copies", file=sys.stderr)
        return 1
    if not final < 0.8 * initial:
        print(f"the loss did not go down enough ({initial:.3f} -> {final:.3f})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
