"""The entry point of every test child (`helpers.Child`, `fanout_helpers.Child`).

Its own module, importing neither torch nor NumPy, so a spawn child that needs neither
starts fast; `children` and `fanout_children` re-export it.
"""

from __future__ import annotations

import pickle
import sys
import traceback


def run_and_report(result_path, target, args):
    """Entry point of every test child: run `target`, write its result or traceback."""
    if "torch" in sys.modules:
        # As torch's DataLoader workers do: a fork child of a process that already ran
        # OpenMP-parallel torch ops hangs in its first parallel op unless it stays on one
        # thread (GNU libgomp is not fork-safe). Not a tensorslab matter.
        sys.modules["torch"].set_num_threads(1)
    try:
        outcome = ("ok", target(*args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    try:
        with open(result_path, "wb") as file:
            pickle.dump(outcome, file)
    except Exception:
        outcome = ("error", traceback.format_exc())
        with open(result_path, "wb") as file:
            pickle.dump(outcome, file)
    if outcome[0] == "error":
        sys.exit(1)
