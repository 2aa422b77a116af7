"""Functions that tests/test_share.py runs in child processes (see `helpers.Child`).

Each bounds every wait with a timeout and returns a picklable result.
"""

from __future__ import annotations

import os
import time

import torch

import tensorslab
from child_runner import run_and_report  # noqa: F401  (re-exported: the entry point)

WAIT = 60


def segment_descriptors(pid: int | None = None) -> list[str]:
    """What `/proc/<pid>/fd` names for every tensorslab segment the process holds open."""
    base = f"/proc/{os.getpid() if pid is None else pid}/fd"
    found = []
    for fd in os.listdir(base):
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue  # the listdir's own descriptor, closed since
        if "tensorslab-" in target:
            found.append(target)
    return found


def segment_mappings(name: str) -> int:
    """Ranges of /proc/self/maps that map segment `name`."""
    with open("/proc/self/maps") as maps:
        return sum(name in line for line in maps)


def tensors_of(obj) -> list:
    if isinstance(obj, torch.nn.Module):
        return [*obj.parameters(), *obj.buffers()]
    return [obj]


def bump_and_wait(obj, delta, done, go, expect_after):
    """Add `delta` to every tensor of `obj` in place, set `done`, wait for `go`, then return
    whether every tensor reads `expect_after` (what the parent wrote since) everywhere."""
    with torch.no_grad():
        for tensor in tensors_of(obj):
            tensor.add_(delta)
    done.set()
    assert go.wait(WAIT), "the parent never said go"
    return all(bool((tensor == expect_after).all()) for tensor in tensors_of(obj))


def count_descriptors(obj):
    """The module or tensor arrived: how many segment descriptors and mappings it took."""
    descriptors = segment_descriptors()
    names = {target.split("memfd:")[-1].split(" ")[0] for target in descriptors}
    mapped = {name: segment_mappings(name) for name in names}
    return len(tensors_of(obj)), descriptors, mapped


def receive_and_bump(source, delta, done):
    """Get a tensor from `source` (a tensorslab or multiprocessing queue), add `delta` to
    it in place, report its values, and set `done`."""
    tensor = source.get(timeout=WAIT)
    with torch.no_grad():
        tensor.add_(delta)
    values = tensor.tolist()
    del tensor
    done.set()
    return values


def create_and_send(out, release):
    """Share a tensor of its own, send it out, then hold it until `release` (or a SIGKILL)."""
    tensor = tensorslab.share(torch.arange(6, dtype=torch.float64))
    out.put(tensor)
    assert release.wait(WAIT), "never released"
    return tensor.tolist()


def hold_until_killed(obj, ready):
    """Keep `obj` (mapped here) and wait to be killed."""
    ready.set()
    time.sleep(WAIT)
    return tensors_of(obj)[0].tolist()


def receive_module_and_bump(source, delta, done):
    """Get a module from `source`, add `delta` to its parameters in place, set `done`."""
    model = source.get(timeout=WAIT)
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.add_(delta)
    done.set()
    return [tensor.tolist() for tensor in model.parameters()]


def pickle_for_later(obj):
    """The reference a `multiprocessing` pickle of `obj` carries, made here (then exit)."""
    from multiprocessing.reduction import ForkingPickler

    return bytes(ForkingPickler.dumps(obj))


def unpickle_and_bump(data, delta):
    """Rebuild a pickled shared tensor, add `delta` to it in place, report its values."""
    import pickle

    tensor = pickle.loads(data)
    with torch.no_grad():
        tensor.add_(delta)
    return tensor.tolist()
