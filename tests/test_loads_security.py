"""What `loads(allow_pickle=False)` and a channel's receiver may find, import and build.

The hostile inputs are real `dumps` output with one part rewritten (`rewrite` below edits
the value stream and fixes the frame prefix), so each test changes one thing an attacker
controls: a field name, a class name, a member name, an item count. Each gets a
`DecodeError` that names the class, the name and the path inside the message; the
legitimate shapes of the same kinds keep round-tripping.
"""

from __future__ import annotations

import struct
import sys
import threading

import numpy as np
import pytest
import torch

import tensorslab
from helpers import run_in_child
from samples import Color, Point, Record

# --- editing frames ------------------------------------------------------------------------

PREFIX = struct.Struct("<4sHHIIQQ")  # magic, version, flags, header_len, arrays, payload, len
PAYLOAD_ALIGN = 64


def uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def s(text: str) -> bytes:
    """A `str` of the value stream: uvarint length + UTF-8."""
    raw = text.encode()
    return uvarint(len(raw)) + raw


def rewrite(data: bytes, *edits: tuple[bytes, bytes]) -> bytes:
    """`data` (a `dumps` frame) with each `old` byte string of its value stream, which must
    occur exactly once, replaced by `new`; the prefix and payload area follow the new size."""
    magic, version, flags, header_len, arrays, payload_offset, _ = PREFIX.unpack_from(data)
    stream = data[PREFIX.size : PREFIX.size + header_len]
    for old, new in edits:
        assert stream.count(old) == 1, f"{old!r} occurs {stream.count(old)} times in {stream!r}"
        stream = stream.replace(old, new)
    payload = data[payload_offset:]
    offset = -(-(PREFIX.size + len(stream)) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    prefix = PREFIX.pack(
        magic, version, flags, len(stream), arrays, offset, offset + len(payload)
    )
    return prefix + stream + bytes(offset - PREFIX.size - len(stream)) + payload


GLOBAL, STR, INT, LIST, DICT = b"\x18", b"\x07", b"\x03", b"\x11", b"\x12"


def global_(module: str, qualname: str) -> bytes:
    return GLOBAL + s(module) + s(qualname)


def refused(data: bytes, message: str, **loads_options) -> None:
    """`loads(data)` raises DecodeError with exactly `message`."""
    with pytest.raises(tensorslab.DecodeError) as raised:
        tensorslab.loads(data, **loads_options)
    assert str(raised.value) == message


# --- threads -------------------------------------------------------------------------------

THREADS = 8
ROUNDS = 10000


def decode_from_threads(frames):
    """Decode `frames` from many threads at once, switching threads as often as possible.

    Before: `Torch::dtype_named` held a Rust mutex across `getattr(torch, name)`, which for
    a name torch lacks runs torch's module __getattr__ (Python code, so the GIL can pass to
    another thread); a second thread then waited for the mutex while holding the GIL, and
    neither could go on. The child hangs and `run_in_child` kills it.
    """
    sys.setswitchinterval(1e-6)
    errors = []

    def work():
        for _ in range(ROUNDS):
            for frame in frames:
                try:
                    tensorslab.loads(frame)
                except tensorslab.DecodeError:
                    pass
                except BaseException as error:
                    errors.append(repr(error))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not any(thread.is_alive() for thread in threads), "decoding threads hung"
    return errors


def test_decoding_from_many_threads_does_not_deadlock():
    float32 = tensorslab.dumps(torch.float32)
    names = ["float32", "no_such_dtype", "bfloat16", "float99", "int8", "complex64", "bogus"]
    frames = [rewrite(float32, (s("float32"), s(name))) for name in names]
    frames += [tensorslab.dumps([Record("r", [1], 2.0), Color.GREEN, Point(1, 2)])]
    frames += [tensorslab.dumps(np.zeros(2, dtype)) for dtype in ["<f4", ">i8", "S3", "<m8[s]"]]
    assert run_in_child("fork", decode_from_threads, frames, timeout=90) == []

