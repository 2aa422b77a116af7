"""What a fork child was handed.

A child forked by ``multiprocessing`` inherits every handle its parent had open, but it is
*handed* only those in its ``Process`` (the ``args``/``kwargs`` of its target, or attributes
of a ``Process`` subclass). Those count as open in the child at once; any other inherited
handle counts only from its first use there. Otherwise two forked consumers would each hold
an untouched copy of the parent's sender and keep each other waiting forever.

The ``Process`` being started is found on the stack of the after-fork hook, which runs
inside ``os.fork()`` called from ``multiprocessing.popen_fork.Popen._launch``. A bare
``os.fork()`` has no such frame: then every inherited handle counts, like pipe ends.
"""

from __future__ import annotations

import sys
from typing import Any

from ._tensorslab import Receiver, Sender

# How far into the Process's attributes to look for handles (containers and objects).
_MAX_DEPTH = 6
_MAX_OBJECTS = 10_000


def process_being_forked() -> Any | None:
    """The ``multiprocessing`` Process whose fork is in progress, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_launch" and "process_obj" in frame.f_locals:
            module = frame.f_globals.get("__name__", "")
            if module.startswith("multiprocessing."):
                return frame.f_locals["process_obj"]
        frame = frame.f_back
    return None


def handles_in(root: Any) -> list[Sender | Receiver]:
    """Every Sender and Receiver reachable from ``root`` through containers and attributes."""
    found: list[Sender | Receiver] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack and len(seen) < _MAX_OBJECTS:
        value, depth = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, (Sender, Receiver)):
            found.append(value)
            continue
        if depth >= _MAX_DEPTH or isinstance(value, (str, bytes, int, float, type(None))):
            continue
        if isinstance(value, dict):
            children = list(value.values())
        elif isinstance(value, (list, tuple, set, frozenset)):
            children = list(value)
        else:
            attributes = getattr(value, "__dict__", None)
            children = list(attributes.values()) if isinstance(attributes, dict) else []
        stack.extend((child, depth + 1) for child in children)
    return found


def handed_to_child() -> list[Sender | Receiver] | None:
    """The handles handed to the process being forked, or None after a bare ``os.fork()``."""
    process = process_being_forked()
    if process is None:
        return None
    return handles_in(process)
