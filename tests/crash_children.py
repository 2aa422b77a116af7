"""Child-process bodies for tests/test_crash.py: processes that get killed on purpose.

Each message carries (producer, seq) and a payload whose checksum rides beside it, so the
test can tell lost, duplicated, reordered and corrupt messages apart.
"""

from __future__ import annotations

import os
import time

import numpy as np

import tensorslab


def message(producer: int, seq: int, nbytes: int) -> dict:
    payload = np.full(nbytes, (producer * 7 + seq) % 251, np.uint8)
    payload[:8] = np.frombuffer(np.int64(seq).tobytes(), np.uint8)
    checksum = int(payload.sum(dtype=np.int64))
    return {"producer": producer, "seq": seq, "sum": checksum, "payload": payload}


def is_intact(msg: dict) -> bool:
    return int(msg["payload"].sum(dtype=np.int64)) == msg["sum"]


def hold_then_wait(rx, count: int, ready) -> None:
    """Take `count` messages, keep every view alive, say so, and wait to be SIGKILLed."""
    held = [rx.get(timeout=60) for _ in range(count)]
    ready.set()
    time.sleep(600)
    del held


def take_forever(rx, log_path: str, started) -> None:
    """Take messages one at a time until killed, logging each one's seq (and whether it was
    intact) to `log_path` after taking it; holds the last one while taking the next."""
    started.set()
    previous = None
    with open(log_path, "a", buffering=1) as log:
        while True:
            try:
                current = rx.get(timeout=60)
            except tensorslab.Closed:
                return
            log.write(f"{current['seq']} {int(is_intact(current))}\n")
            del previous
            previous = current


def put_forever(tx, producer: int, nbytes: int, started) -> None:
    """Put numbered messages until killed (killed mid-put, most of the time, for big ones)."""
    started.set()
    seq = 0
    while True:
        tx.put(message(producer, seq, nbytes), timeout=60)
        seq += 1


def create_and_hold(report_path: str, ready) -> None:
    """Create a channel, put and hold messages on both ends, report the channel's id, wait
    to be killed: the test then checks that nothing of the channel survives."""
    tx, rx = tensorslab.channel(capacity=8)
    for seq in range(4):
        tx.put(message(0, seq, 1 << 20))
    held = rx.get(timeout=30)
    with open(report_path, "w") as file:
        file.write(repr(tx).split("channel ")[1].split(">")[0].split()[0])
    ready.set()
    time.sleep(600)
    del held


def pid() -> int:
    return os.getpid()


def drop_inherited_views_then_use_endpoints(box, tx, rx) -> int:
    """In a fork child: drop the views inherited from the parent (their memory is the
    parent's to release), then send and receive a message of this process's own."""
    import gc

    box.clear()
    gc.collect()
    tx.put(np.full(1 << 20, 5, np.uint8), timeout=30)
    own = rx.get(timeout=30)
    total = int(own.sum())
    del own
    gc.collect()
    return total


def put_three(tx) -> None:
    for i in range(3):
        tx.put(i, timeout=30)
    tx.close()
