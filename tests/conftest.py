"""Suite-wide guards: after every test, no tensorslab segment may remain.

A test's channels are gone once the test returns and the garbage collector has run: its
handles and received views were locals. Whatever segment is still visible then (a
descriptor or mapping of this process, or a named file in /dev/shm) is a leak, and the test
that leaked it fails at teardown with the list.
"""

from __future__ import annotations

import gc
import os
import time

import pytest

from tensorslab.testing import leaked_segments

# Files in /dev/shm can belong to a child process that is still exiting; give those a
# moment. This process's own descriptors and mappings get no grace: they must be gone.
NAMED_FILE_GRACE_SECONDS = 5.0


def _leaks_after_collect() -> list[str]:
    # A full collection costs tens of milliseconds with torch loaded; most tests leave
    # nothing, so collect only when the cheap scan finds something.
    found = leaked_segments()
    if found:
        gc.collect()
        found = leaked_segments()
    return found


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture(autouse=True)
def no_leaked_segments(request):
    before = set(leaked_segments())
    yield
    call = getattr(request.node, "report_call", None)
    if call is not None and call.failed:
        # The failure's traceback keeps the test's frames (and so its handles) alive;
        # a leak report on top would only repeat the failure.
        return
    new = [leak for leak in _leaks_after_collect() if leak not in before]
    deadline = time.monotonic() + NAMED_FILE_GRACE_SECONDS
    while new and all(leak.startswith("file ") for leak in new):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
        new = [leak for leak in _leaks_after_collect() if leak not in before]
    if new:
        listing = "\n  ".join(new)
        pytest.fail(
            f"tensorslab segments left after the test, after gc.collect() (pid {os.getpid()}); "
            f"a handle or received view outlived the test, or the library leaked:\n  {listing}",
            pytrace=False,
        )
