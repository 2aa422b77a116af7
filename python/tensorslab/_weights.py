"""Copying a received state dict into a module or a dict of tensors (`Reader.load_into`)."""

from __future__ import annotations

import warnings
from typing import Any


def _targets(target: Any) -> dict[str, Any]:
    """The tensors to fill: a module's parameters and persistent buffers, or a dict's items."""
    if isinstance(target, dict):
        return target
    state_dict = getattr(target, "state_dict", None)
    if state_dict is None:
        raise TypeError(
            f"load_into needs an nn.Module or a dict of tensors, got {type(target).__name__}"
        )
    # keep_vars: the parameters themselves, not detached copies, so copy_ lands in them.
    return state_dict(keep_vars=True)


def load_state(target: Any, state: Any, version: int) -> None:
    """Copies every tensor of `state` (version `version`) into the matching one of `target`.

    Checks everything before copying anything, so a mismatch leaves `target` unchanged.
    """
    import torch

    if not isinstance(state, dict):
        raise TypeError(
            f"version {version} is a {type(state).__name__}, not a state dict: load_into "
            "needs the writer to publish a dict of tensors"
        )
    targets = _targets(target)
    missing = sorted(set(targets) - set(state))
    unexpected = sorted(set(state) - set(targets))
    if missing or unexpected:
        raise ValueError(
            f"version {version} does not match the target: missing {missing}, "
            f"unexpected {unexpected}"
        )
    pairs = []
    for name, destination in targets.items():
        source = state[name]
        if not isinstance(destination, torch.Tensor):
            raise TypeError(f"target[{name!r}] is a {type(destination).__name__}, not a tensor")
        if not isinstance(source, torch.Tensor):
            # A read-only NumPy view of the mailbox: torch warns that it cannot make it
            # read-only, but it is only read from here (copy_ below).
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given NumPy array is not writable")
                source = torch.as_tensor(source)
        if source.shape != destination.shape:
            raise ValueError(
                f"state[{name!r}] of version {version} has shape {tuple(source.shape)}, "
                f"the target's has {tuple(destination.shape)}"
            )
        if source.dtype != destination.dtype:
            raise ValueError(
                f"state[{name!r}] of version {version} is {source.dtype}, "
                f"the target's is {destination.dtype}"
            )
        pairs.append((destination, source))
    with torch.no_grad():
        for destination, source in pairs:
            destination.copy_(source)
