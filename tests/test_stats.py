"""What stats() and Full errors say about who holds memory."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tensorslab


def test_bytes_received_counts_alloc_payloads():
    tx, rx = tensorslab.channel()
    buffer = tx.alloc((1 << 20,), np.uint8)
    buffer[:] = 3
    tx.put({"data": buffer})
    msg = rx.get(timeout=10)
    assert int(msg["data"].sum()) == 3 << 20
    sent, received = tx.stats()["bytes_sent"], rx.stats()["bytes_received"]
    assert sent == received, (sent, received)
    assert received >= 1 << 20


def test_full_names_alloc_buffers_and_receivers_separately():
    tx, rx = tensorslab.channel(16, slab_bytes=4 << 20, max_slab_bytes=8 << 20)
    tx.put(np.ones(2 << 20, np.uint8))
    held = rx.get(timeout=10)  # a message held by this receiver
    buffers = []
    with pytest.raises(tensorslab.Full) as raised:
        for _ in range(8):
            buffers.append(tx.alloc((1 << 20,), np.uint8, timeout=0.2))
    text = str(raised.value)
    assert "alloc buffers" in text and "held by receivers" in text, text
    assert f"pids {os.getpid()}" in text, text
    del held, buffers
    assert tx.stats()["slab_used_bytes"] == 0
