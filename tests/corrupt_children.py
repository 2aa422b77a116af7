"""Playing a corrupt peer of a channel (see `test_corrupt_peer.py`): the layout of its
shared memory, reading and writing it through a process's descriptors, frames written by
hand, and the functions the tests run in child processes.

The layout mirrors `src/layout.rs` and `src/slab/block.rs`;
`test_corrupt_peer.test_layout_offsets_match_a_live_channel` checks it against a live
channel. This module imports neither pytest nor torch, so spawn children start quickly.
"""

from __future__ import annotations

import collections
import multiprocessing as mp
import os
import pickle
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback

import numpy as np

import tensorslab
from tensorslab.testing import segment_paths

# --- the layout of shared memory ------------------------------------------------------------

# Control block (`layout::ControlBlock`), offsets in the control segment.
MAGIC = 0
ABI_VERSION = 8
HEADER_SIZE = 12
CAPACITY = 24
MAX_SLAB_BYTES = 40
CONTROL_LEN = 48
RING_LOCK = 56
HEAP_LOCK = 60
RING_HEAD = 64
RING_TAIL = 72
RING_STATE_END = 96
SEGMENT_COUNT = 96
SEGMENT_RECORDS = 1456  # 48 x (len, device, inode, lost), 8 bytes each
SEGMENT_RECORD = 32
HANDLES = 2992
PROCESSES = 4032
PROCESS_SLOT = 272
PROCESS_SEGMENT_FDS = 44
PID_MASK = (1 << 30) - 1  # `ProcessSlot::state`: generation:32 | phase:2 | pid:30
CONTROL_BLOCK_SIZE = 81880
RING_OFFSET = 81920  # the control block rounded up to 64
CELL = 16
# Block header (`slab::block::BlockHeader`), offsets from the start of a block.
SIZE_STATE = 0
OWNER = 40
OWNER_KIND_SHIFT = 48  # `owner_word`: kind:16 | generation:32 | slot:16
CONTENT_LEN = 56
HEADER_LEN = 64
STATE_USED = 1
OWNER_ALLOC = 4
OFFSET_BITS = 40

CONTROL_MAGIC = b"TSLBCTL\0"
FRAME_MAGIC = b"TSLF"

MiB = 1 << 20


class Segments:
    """One channel's shared memory, reached through the descriptors of one process."""

    def __init__(self, channel_id: str, paths: dict[str, str]):
        self.channel_id = channel_id
        self.paths = paths

    @classmethod
    def of(cls, channel_id: str, pid: int | None = None) -> Segments:
        prefix = f"tensorslab-{channel_id}-"
        paths = {
            name[len(prefix) :]: path
            for name, path in segment_paths(pid).items()
            if name.startswith(prefix)
        }
        return cls(channel_id, paths)

    def path(self, segment: str | int) -> str:
        return self.paths[str(segment)]

    def size(self, segment: str | int) -> int:
        return os.stat(self.path(segment)).st_size

    def read(self, segment: str | int, offset: int, length: int) -> bytes:
        fd = os.open(self.path(segment), os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def write(self, segment: str | int, offset: int, data: bytes) -> None:
        fd = os.open(self.path(segment), os.O_RDWR)
        try:
            assert os.pwrite(fd, data, offset) == len(data)
        finally:
            os.close(fd)

    def u32(self, segment: str | int, offset: int) -> int:
        return struct.unpack("<I", self.read(segment, offset, 4))[0]

    def u64(self, segment: str | int, offset: int) -> int:
        return struct.unpack("<Q", self.read(segment, offset, 8))[0]

    def put_u32(self, segment: str | int, offset: int, value: int) -> None:
        self.write(segment, offset, struct.pack("<I", value & 0xFFFF_FFFF))

    def put_u64(self, segment: str | int, offset: int, value: int) -> None:
        self.write(segment, offset, struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF))

    def queued(self, capacity: int) -> list[tuple[int, int]]:
        """(segment, offset) of each message in a ring of `capacity` cells, oldest first
        (`capacity` is the one the channel was made with: the word in shared memory may be
        corrupt by now)."""
        head, tail = self.u64("control", RING_HEAD), self.u64("control", RING_TAIL)
        found = []
        for index in range(head, min(tail, head + capacity)):
            block = self.u64("control", RING_OFFSET + CELL * (index % capacity))
            found.append((block >> OFFSET_BITS, block & ((1 << OFFSET_BITS) - 1)))
        return found

    def blocks(self, segment: int) -> list[tuple[int, int, int]]:
        """(offset, size, state) of the blocks of a segment, walked by their sizes."""
        data = self.read(segment, 0, self.size(segment))
        found, offset = [], 0
        while offset + HEADER_LEN <= len(data):
            word = struct.unpack_from("<Q", data, offset)[0]
            size, state = word & ~63, word & 63
            if size < HEADER_LEN or offset + size > len(data):
                break
            found.append((offset, size, state))
            offset += size
        return found


def link(segment: int, offset: int) -> int:
    """A block reference as frames and free lists write it (`SlabRef + 1`)."""
    return (segment << OFFSET_BITS | offset) + 1


# --- frames, written by hand ----------------------------------------------------------------


def uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def text(value: str) -> bytes:
    data = value.encode()
    return uvarint(len(data)) + data


def frame(stream: bytes, *, payload_len: int = 0, arrays: int = 0, alloc_blocks=()) -> bytes:
    """A frame prefix and value stream (see `src/header/mod.rs`) for a payload area of
    `payload_len` bytes; the payload bytes themselves are not included."""
    prelude = uvarint(len(alloc_blocks)) + b"".join(uvarint(block) for block in alloc_blocks)
    body = prelude + stream
    payload_offset = (32 + len(body) + 63) // 64 * 64
    prefix = FRAME_MAGIC + struct.pack(
        "<HHIIQQ", 1, 0, len(body), arrays, payload_offset, payload_offset + payload_len
    )
    return prefix + body


def frame_len(data: bytes) -> int:
    return struct.unpack_from("<Q", data, 24)[0]


def array_of_bytes(location: tuple[int, int, int]) -> bytes:
    """An `Array` value: a 1-d uint8 NumPy array of the payload at `location`."""
    block, offset, nbytes = location
    return (
        bytes([0x20, 0, 0, 0x07])
        + text("|u1")
        + uvarint(1)
        + uvarint(nbytes)
        + uvarint(block)
        + uvarint(offset)
        + uvarint(nbytes)
    )


def write_frame(shm: Segments, block: tuple[int, int], data: bytes) -> None:
    """Replaces the frame of the message in `block` and its header's content length."""
    segment, offset = block
    shm.write(segment, offset + HEADER_LEN, data)
    shm.put_u64(segment, offset + CONTENT_LEN, frame_len(data))


# --- child processes ------------------------------------------------------------------------


def _report(result_path, target, args):
    try:
        outcome = ("ok", target(*args))
    except BaseException:
        outcome = ("error", traceback.format_exc())
    with open(result_path, "wb") as file:
        pickle.dump(outcome, file)


class Peer:
    """A child process running ``target(*args)``; `finish` says how it ended."""

    def __init__(self, ctx_name: str, target, *args):
        fd, self.result_path = tempfile.mkstemp(prefix="tsl-corrupt-peer-", suffix=".pkl")
        os.close(fd)
        self.name = f"{target.__name__}[{ctx_name}]"
        self.process = mp.get_context(ctx_name).Process(
            target=_report, args=(self.result_path, target, args), daemon=True
        )
        self.process.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def finish(self, timeout: float):
        """Waits up to `timeout` s; returns what the target returned, or fails the test
        with how the child died (a signal, a hang, an exception)."""
        self.process.join(timeout)
        hung = self.process.is_alive()
        if hung:
            self.process.kill()
            self.process.join(30)
        try:
            with open(self.result_path, "rb") as file:
                outcome = pickle.load(file)
        except (OSError, EOFError, pickle.UnpicklingError):
            outcome = None
        finally:
            os.unlink(self.result_path)
        if hung:
            raise AssertionError(f"{self.name} still running after {timeout} s (hung): killed")
        code = self.process.exitcode
        if code is not None and code < 0:
            raise AssertionError(f"{self.name} killed by {signal.Signals(-code).name}")
        if outcome is None or outcome[0] == "error":
            detail = outcome[1] if outcome else "no result"
            raise AssertionError(f"{self.name} exited with code {code}:\n{detail}")
        return outcome[1]


def plain(value):
    """`value` made of builtins only (arrays as their dtype, shape and bytes), so it can be
    sent back to the test; reading every array byte is also the check that a view lies in
    mapped memory."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return ("ndarray", str(value.dtype), value.shape, value.tobytes())
    return value


def get_once(rx, import_path=None, timeout=10):
    """One `get`; what arrived, or which exception it raised."""
    if import_path is not None:
        sys.path.insert(0, import_path)
    try:
        value = plain(rx.get(timeout=timeout))
    except Exception as error:
        return ("raised", type(error).__name__, str(error))
    finally:
        rx.close()
    return ("got", value)


def attach_and_get_once(pickled):
    """Attaches the receiver pickled in `pickled` (in this child, so that a refusal can be
    reported), then does one `get`."""
    try:
        rx = pickle.loads(pickled)
    except Exception as error:
        return ("raised", type(error).__name__, str(error))
    return get_once(rx)


# --- the fuzzer's children ----------------------------------------------------------------

#: Calls each child makes, for this long after it starts, each with this timeout.
CHILD_BUDGET = 1.5
CALL_TIMEOUT = 0.5
#: The children run with these limits: a corrupt `max_slab_bytes` can make a producer
#: create large segments, and a bug that grows memory without end would take a shared
#: machine's memory. Past them, a segment fails to grow (`ShmError`) and the bug aborts the
#: child (a signal death the test reports) instead.
CHILD_FILE_LIMIT = 32 * MiB
CHILD_ADDRESS_SPACE = 4 << 30


def limit_resources():
    resource.setrlimit(resource.RLIMIT_FSIZE, (CHILD_FILE_LIMIT, CHILD_FILE_LIMIT))
    resource.setrlimit(resource.RLIMIT_AS, (CHILD_ADDRESS_SPACE, CHILD_ADDRESS_SPACE))


class Tally:
    """What a child's calls did: counts by outcome, and anything that is not tensorslab's."""

    def __init__(self):
        self.counts = collections.Counter()
        self.foreign = []

    def call(self, function, *args, **kwargs):
        try:
            result = function(*args, **kwargs)
        except tensorslab.TensorslabError as error:
            self.counts[type(error).__name__] += 1
        except ValueError as error:
            # tensorslab's own argument checks (a corrupt max_slab_bytes makes a message
            # "too large"); anything else would be a bug.
            self.counts["ValueError"] += 1
            if "max_slab_bytes" not in str(error):
                self.foreign.append(traceback.format_exc())
        except BaseException:
            self.foreign.append(traceback.format_exc())
        else:
            self.counts["ok"] += 1
            return result
        if max(self.counts.values()) - self.counts["ok"] > 100:
            # Calls that keep failing at once the same way (a closed channel, a corrupt
            # free list) would only spin on shared cores.
            time.sleep(0.001)
        return None

    def result(self):
        return {"counts": dict(self.counts), "foreign": self.foreign[:3]}


def fuzz_producer(tx, seed, ready):
    limit_resources()
    rng = random.Random(seed)
    tally = Tally()
    ready.set()
    end = time.monotonic() + CHILD_BUDGET
    step = 0
    while time.monotonic() < end:
        step += 1
        choice = rng.random()
        if choice < 0.5:
            size = rng.choice([1, 100, 5000, 70_000, 300_000])
            message = {"step": step, "a": np.full(size, step % 251, np.uint8), "s": "x" * 30}
            tally.call(tx.put, message, timeout=CALL_TIMEOUT)
        elif choice < 0.75:
            size = rng.choice([16, 4096, 100_000])
            buffer = tally.call(tx.alloc, size, np.uint8, timeout=CALL_TIMEOUT)
            if buffer is not None:
                buffer[:] = step % 251
                tally.call(tx.put, {"alloc": buffer, "step": step}, timeout=CALL_TIMEOUT)
            del buffer
        elif choice < 0.9:
            tally.call(tx.put_nowait, [step, b"y" * rng.randint(0, 3000)])
        else:
            tally.call(tx.stats)
            tally.call(tx.has_space, 1000)
            tally.call(tx.qsize)
    tally.call(tx.wait_for_all_ack, timeout=CALL_TIMEOUT)
    tally.call(tx.close)
    return tally.result()


def fuzz_consumer(rx, seed, ready):
    limit_resources()
    rng = random.Random(seed)
    tally = Tally()
    ready.set()
    end = time.monotonic() + CHILD_BUDGET
    while time.monotonic() < end:
        if rng.random() < 0.9:
            message = tally.call(rx.get, timeout=CALL_TIMEOUT, copy=rng.random() < 0.3)
            tally.call(plain, message)  # reads every byte of every array
            del message
        else:
            tally.call(rx.stats)
            tally.call(rx.qsize)
    tally.call(rx.close)
    return tally.result()
