"""Helpers for testing code that uses tensorslab.

:func:`leaked_segments` lists the shared-memory segments of tensorslab channels that this
process can still see. Once every handle and every received view of a channel is gone (and
the garbage collector has run), it must return nothing for that channel; test suites call
it after each test to catch leaks::

    import gc
    from tensorslab.testing import leaked_segments

    def teardown_function():
        gc.collect()
        assert not leaked_segments()

Where segments live (see the crate's ``shm`` module): a segment is a memfd named
``tensorslab-<channel id hex>-control`` or ``tensorslab-<channel id hex>-<index>``, or, when
``TENSORSLAB_SHM_DIR`` is set, a file of that name created in that directory and unlinked
at once. Either way a live segment shows up in ``/proc/self/fd`` (while a descriptor is
open) and ``/proc/self/maps`` (while it is mapped); a named file left in ``/dev/shm`` or in
``TENSORSLAB_SHM_DIR`` would outlive every process and is a leak whoever made it.

For tests that play a corrupt or hostile peer, :func:`segment_paths` returns a path
through which each segment of a process can be opened (as tensorslab itself attaches), so a
test can write whatever bytes it likes into a live channel's shared memory.

Pure Python and Linux only (it reads ``/proc``); it imports nothing from the extension, so
it works even when the extension itself is broken.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable

__all__ = [
    "SEGMENT_PREFIX",
    "SHM_DIR_ENV",
    "leaked_segments",
    "segment_directories",
    "segment_paths",
]

#: Every segment name starts with this.
SEGMENT_PREFIX = "tensorslab-"
#: Environment variable naming a directory to create segments in instead of memfds.
SHM_DIR_ENV = "TENSORSLAB_SHM_DIR"

# A segment name, as the core formats it: 16 hex digits of channel id, then `control` or the
# slab segment index. Kept tight so that a checkout in a directory called `tensorslab-...`
# (whose extension shows up in /proc/self/maps) is not taken for a segment.
_NAME = r"tensorslab-[0-9a-f]+-(?:control|[0-9]+)\b"


def segment_directories() -> list[str]:
    """Directories where a named segment file would be a leak: ``/dev/shm`` and, when set,
    ``$TENSORSLAB_SHM_DIR``."""
    directories = ["/dev/shm"]
    configured = os.environ.get(SHM_DIR_ENV)
    if configured:
        directories.append(configured)
    return directories


def _segment_pattern() -> re.Pattern[str]:
    """Matches a segment where `/proc` names it: ``memfd:tensorslab-...`` for a memfd, or
    ``<dir>/tensorslab-...`` (usually followed by `` (deleted)``) for a file-backed one."""
    places = [re.escape("memfd:")]
    for directory in segment_directories():
        for form in {directory, os.path.realpath(directory)}:
            places.append(re.escape(form.rstrip("/") + "/"))
    return re.compile(f"(?:{'|'.join(places)}){_NAME}")


def _named_files(directories: Iterable[str]) -> list[str]:
    found = []
    for directory in directories:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        found.extend(
            f"file {os.path.join(directory, name)}"
            for name in names
            if name.startswith(SEGMENT_PREFIX)
        )
    return found


def _open_descriptors(pattern: re.Pattern[str]) -> list[str]:
    found = []
    try:
        descriptors = os.listdir("/proc/self/fd")
    except OSError:
        return found
    for fd in sorted(descriptors, key=lambda name: int(name) if name.isdigit() else -1):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed between listdir and readlink (e.g. the listdir's own fd)
        if pattern.search(target):
            found.append(f"descriptor {fd} -> {target}")
    return found


def _mappings(pattern: re.Pattern[str]) -> list[str]:
    counts: dict[str, int] = {}
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:
        return []
    for line in lines:
        match = pattern.search(line)
        if match:
            # A segment can be mapped in several ranges; report it once with a count.
            counts[match.group(0)] = counts.get(match.group(0), 0) + 1
    return [f"mapping of {name} ({count} range(s))" for name, count in sorted(counts.items())]


def leaked_segments() -> list[str]:
    """Describe every tensorslab segment still visible to this process.

    Returns one human-readable line per finding, e.g.
    ``"descriptor 7 -> /memfd:tensorslab-1a2b...-control (deleted)"``,
    ``"mapping of memfd:tensorslab-1a2b...-0 (2 range(s))"`` or
    ``"file /dev/shm/tensorslab-..."``; an empty list means nothing leaked.

    It reports (a) files whose names start with ``tensorslab-`` in ``/dev/shm`` and in
    ``$TENSORSLAB_SHM_DIR`` (whichever process created them), and (b) descriptors and
    mappings of this process that refer to a tensorslab segment. Call :func:`gc.collect`
    first: a handle or view caught in a reference cycle keeps its segment until then.
    """
    pattern = _segment_pattern()
    return _named_files(segment_directories()) + _open_descriptors(pattern) + _mappings(pattern)


def segment_paths(pid: int | None = None) -> dict[str, str]:
    """Test-only: the tensorslab segments process ``pid`` (default: this one) holds open.

    Maps each segment's name (``tensorslab-<channel id hex>-control`` or
    ``tensorslab-<channel id hex>-<index>``) to ``/proc/<pid>/fd/<n>``, a path that opens that
    segment for as long as the process holds the descriptor. Opening another process's path
    needs the same user and a dumpable process, as attaching a channel does. Writing through
    it changes the channel's shared memory under every process that maps it: that is what
    the corrupt-peer tests do. Any live process of a channel holds its control segment and
    every slab segment it has mapped.
    """
    base = f"/proc/{os.getpid() if pid is None else pid}/fd"
    pattern = _segment_pattern()
    found = {}
    try:
        descriptors = os.listdir(base)
    except OSError:
        return found
    for fd in descriptors:
        try:
            target = os.readlink(f"{base}/{fd}")
        except OSError:
            continue  # closed between listdir and readlink
        match = pattern.search(target)
        if match:
            name = re.search(_NAME, match.group(0))
            if name:
                found.setdefault(name.group(0), f"{base}/{fd}")
    return found
