"""An actor process feeds a learner through a tensorslab channel (the example of issue 3).

    python examples/actor_learner.py            # 1000 steps
    python examples/actor_learner.py --smoke    # 50 steps (CI)

The actor puts dicts holding a torch tensor, a numpy mask and a tuple; the learner iterates
``for msg in rx`` until the actor closes its sender, and reads zero-copy views into shared
memory. The actor builds each observation with ``torch.randn``, which costs more than sending
it, so steps/s here is the actor's pace; ``rx.stats()`` shows how long the learner waited.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import time

import numpy as np
import torch

import tensorslab


def actor(tx: tensorslab.Sender, steps: int) -> None:
    for i in range(steps):
        tx.put(
            {
                "step": i,
                "obs": torch.randn(64, 3, 84, 84),
                "mask": np.ones(64, bool),
                "tag": ("actor", 3),
            }
        )
    tx.close()


def train(obs: torch.Tensor, mask: np.ndarray) -> float:
    # Reads every element of obs in place (no copy): the learner's stand-in for a step.
    per_env = obs.mean(dim=(1, 2, 3))
    return float((per_env * torch.from_numpy(mask)).sum())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="50 steps")
    parser.add_argument("--steps", type=int, help="steps to send (default 1000, 50 with --smoke)")
    args = parser.parse_args()
    steps = args.steps or (50 if args.smoke else 1000)

    tx, rx = tensorslab.channel(capacity=8)
    process = mp.get_context("spawn").Process(target=actor, args=(tx, steps))
    process.start()
    tx.close()  # the child holds its own handle now

    received, start = 0, None
    for msg in rx:  # ends when every sender has closed
        if start is None:
            start = time.perf_counter()  # from the first step: the child's start-up is not counted
        assert msg["step"] == received, f"step {msg['step']} arrived, {received} expected"
        assert isinstance(msg["obs"], torch.Tensor) and msg["obs"].shape == (64, 3, 84, 84)
        assert isinstance(msg["mask"], np.ndarray) and msg["mask"].dtype == bool
        assert msg["tag"] == ("actor", 3)
        train(msg["obs"], msg["mask"])
        received += 1
    msg = None  # the last message's views would hold its slab memory (and show in stats)
    elapsed = time.perf_counter() - (start or time.perf_counter())
    process.join(30)
    stats = rx.stats()
    rx.close()

    if received != steps or process.exitcode != 0:
        print(f"FAILED: {received} of {steps} steps arrived; actor exit code {process.exitcode}")
        return 1
    per_step = 64 * 3 * 84 * 84 * 4 + 64
    rate = (received - 1) / elapsed if elapsed > 0 else float("nan")
    gib_s = rate * per_step / 2**30
    print(f"learner received {received} steps: {rate:,.0f} steps/s, {gib_s:.2f} GiB/s")
    print(f"rx.stats() = {stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
