"""Task functions for tests/test_executor.py: importable by name, so `spawn` workers find
them. None imports torch at module level (a spawn worker that needs no torch starts fast)."""

from __future__ import annotations

import os
import signal
import sys
import time

import numpy as np

#: Set by `remember` (an initializer) in the worker that runs it.
initialized: tuple = ()


def add_one(x):
    return x + 1


def power(base, exponent=2):
    return base**exponent


def echo(value):
    return value


def pid_after(seconds: float) -> int:
    time.sleep(seconds)
    return os.getpid()


def boom(value):
    raise ValueError(f"boom: {value}")


def unpicklable_result():
    return lambda: None  # nothing can encode a lambda


def kill_self():
    os.kill(os.getpid(), signal.SIGKILL)


def remember(*args):
    global initialized
    initialized = args


def what_was_initialized():
    return initialized


def failing_initializer():
    raise RuntimeError("initializer failed on purpose")


def segment_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's mappings of tensorslab segments."""
    ranges = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if "tensorslab-" in line and ("memfd:" in line or "/tensorslab-" in line):
                start, end = line.split()[0].split("-")
                ranges.append((int(start, 16), int(end, 16)))
    return ranges


def in_segment(address: int) -> bool:
    return any(start <= address < end for start, end in segment_ranges())


def array_address(array) -> int:
    return array.__array_interface__["data"][0]


def describe_and_double(array):
    """What the worker received (a view into a slab segment?) and ``array * 2``."""
    return (
        {
            "base": type(array.base).__name__,
            "in_segment": in_segment(array_address(array)),
            "writeable": bool(array.flags.writeable),
            "sum": float(array.sum()),
        },
        array * 2,
    )


def torch_describe_and_double(tensor):
    torch = sys.modules["torch"]  # the decoder imported it to build the tensor
    return (
        {
            "type": type(tensor).__name__,
            "in_segment": in_segment(tensor.untyped_storage().data_ptr()),
            "dtype": str(tensor.dtype),
        },
        {"doubled": tensor * 2, "ones": torch.ones(3, dtype=torch.int16)},
    )


def big_result(nbytes: int):
    return np.full(nbytes, 7, np.uint8)


def orphan_workers(ctx_name: str, path: str) -> None:
    """Starts an executor, writes its workers' pids to ``path`` and dies by SIGKILL while
    one of them runs a task and the other waits for one."""
    import multiprocessing as mp

    import tensorslab

    executor = tensorslab.ProcessPoolExecutor(2, mp_context=mp.get_context(ctx_name))
    list(executor.map(pid_after, [0.1] * 4))
    executor.submit(pid_after, 0.5)
    pids = sorted(executor._manager.processes)
    with open(path, "w") as file:
        file.write(" ".join(map(str, pids)))
    os.kill(os.getpid(), signal.SIGKILL)


def _refuse_to_load():
    raise RuntimeError("this result refuses to be loaded")


class LoadsNowhere:
    """Pickles fine in the worker; unpickling it (in the parent) raises."""

    def __reduce__(self):
        return (_refuse_to_load, ())


def undecodable_result():
    return {"fine": np.ones(3), "not": LoadsNowhere()}


def pid_once_exists(path: str, timeout: float = 60.0) -> int:
    """Blocks until ``path`` exists (the test's go-ahead), then returns the worker's pid;
    raises after ``timeout`` so that a worker never waits forever."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)
    return os.getpid()
