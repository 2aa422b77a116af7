"""The hand-written `_tensorslab.pyi` matches the extension (mypy.stubtest), ships with
`py.typed`, and lets a type checker see the public API."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import tensorslab

PACKAGE = Path(tensorslab.__file__).parent


def run_mypy_tool(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=100,
    )


def test_stub_and_marker_ship_in_the_package():
    assert (PACKAGE / "_tensorslab.pyi").is_file()
    assert (PACKAGE / "py.typed").is_file()


def test_stubtest(tmp_path):
    result = run_mypy_tool("mypy.stubtest", "tensorslab._tensorslab", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_public_api_type_checks(tmp_path):
    usage = tmp_path / "usage.py"
    usage.write_text(
        textwrap.dedent(
            """
            import queue

            import numpy as np
            import tensorslab

            def main() -> None:
                tx, rx = tensorslab.channel(64, slab_bytes=None, max_slab_bytes=1 << 26)
                with tx, rx:
                    tx.put({"a": np.zeros(3)}, block=True, timeout=1.0)
                    tx.put_nowait(1)
                    ok: bool = tx.has_space(10) and tx.wait_for_all_ack(timeout=0.5)
                    stats = tx.stats()
                    message = rx.get(block=True, timeout=1.0, copy=False)
                    other = rx.get_nowait()
                    for item in rx:
                        print(item, message, other, ok, stats)
                data: bytes = tensorslab.dumps([1, 2])
                tensorslab.loads(data, allow_pickle=False)
                q = tensorslab.Queue(maxsize=0)
                q.put(1)
                q.get(timeout=1.0)
                try:
                    pass
                except (tensorslab.Full, tensorslab.Empty, tensorslab.Closed, queue.Full):
                    pass
            """
        )
    )
    result = run_mypy_tool("mypy", "--strict", "--no-incremental", str(usage), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
