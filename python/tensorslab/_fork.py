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
import weakref
from typing import Any

from . import _tensorslab
from ._tensorslab import Handle

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


def handles_in(root: Any) -> list[Handle]:
    """Every handle (Sender, Receiver, Publisher, Subscriber, Writer, Reader) reachable from
    ``root`` through containers and attributes."""
    found: list[Handle] = []
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack and len(seen) < _MAX_OBJECTS:
        value, depth = stack.pop()
        if id(value) in seen:
            continue
        seen.add(id(value))
        if isinstance(value, Handle):
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


def handed_to_child() -> list[Handle] | None:
    """The handles handed to the process being forked, or None after a bare ``os.fork()``."""
    process = process_being_forked()
    if process is None:
        return None
    return handles_in(process)


# --- tickets handed to spawn and forkserver children ---------------------------------------
#
# A pickled handle (a ticket) counts as open until it is loaded, so a channel cannot close
# between `Process.start()` and the child attaching. A child killed before it loads its
# arguments would keep its ticket pending forever (and a pending slot: there are 128). When
# the ticket is pickled for a `multiprocessing` child, its `Popen` is remembered; once that
# child has exited, its ticket is cancelled (a no-op if the child did load it).

_tickets: list[tuple[weakref.ref, bytes]] = []


def _popen_being_launched() -> Any | None:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_launch" and "self" in frame.f_locals:
            if frame.f_globals.get("__name__", "").startswith("multiprocessing.popen_"):
                return frame.f_locals["self"]
        frame = frame.f_back
    return None


def ticket_issued(state: bytes) -> None:
    """Called by the extension after pickling a handle."""
    popen = _popen_being_launched()
    if popen is not None:
        _tickets.append((weakref.ref(popen), state))


def sweep_tickets() -> None:
    """Cancels the tickets of children that exited (called before each new pickling)."""
    keep = []
    for ref, state in _tickets:
        popen = ref()
        # A Popen that is gone was joined: its child exited. One whose pid is still unset
        # is being launched right now.
        launched = popen is not None and getattr(popen, "pid", None) is not None
        if popen is None or (launched and popen.poll() is not None):
            _tensorslab._drop_ticket(state)
        else:
            keep.append((ref, state))
    _tickets[:] = keep
