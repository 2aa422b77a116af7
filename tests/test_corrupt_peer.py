"""A corrupt peer cannot crash or hang the others (issue 10).

Nothing a process reads from a channel's shared memory is trusted: the tests here write
wrong values into a live channel, as a broken or hostile peer could, through the segments'
descriptors (`tensorslab.testing.segment_paths`), and check that the processes using the
channel get tensorslab errors (or carry on), and are never killed by SIGSEGV/SIGBUS nor hang
past their calls' timeouts.

The first tests each aim one corrupt value at one check; the last one is a seeded fuzzer
that writes random bytes over random parts of a channel that a producer and a consumer
child are using. The layout they write into, and the children, are in
`corrupt_children.py`; `test_layout_offsets_match_a_live_channel` checks that layout.
"""

from __future__ import annotations

import collections
import gc
import multiprocessing as mp
import os
import pickle
import random
import struct
import time

import numpy as np
import pytest

import tensorslab
from corrupt_children import (
    ABI_VERSION,
    CAPACITY,
    CELL,
    CHILD_BUDGET,
    CONTENT_LEN,
    CONTROL_BLOCK_SIZE,
    CONTROL_LEN,
    CONTROL_MAGIC,
    FRAME_MAGIC,
    HANDLES,
    HEADER_LEN,
    HEADER_SIZE,
    MAGIC,
    MAX_SLAB_BYTES,
    OWNER,
    OWNER_ALLOC,
    OWNER_KIND_SHIFT,
    PID_MASK,
    PROCESS_SEGMENT_FDS,
    PROCESS_SLOT,
    PROCESSES,
    RING_HEAD,
    RING_LOCK,
    RING_OFFSET,
    RING_STATE_END,
    RING_TAIL,
    SEGMENT_COUNT,
    SEGMENT_RECORD,
    SEGMENT_RECORDS,
    SIZE_STATE,
    STATE_USED,
    MiB,
    Peer,
    Segments,
    array_of_bytes,
    attach_and_get_once,
    frame,
    frame_len,
    fuzz_consumer,
    fuzz_producer,
    get_once,
    link,
    text,
    uvarint,
    write_frame,
)
from tensorslab.testing import segment_paths


def new_channel(**options):
    """A channel and its shared memory (as this process holds it)."""
    before = set(segment_paths())
    tx, rx = tensorslab.channel(**options)
    names = [name for name in segment_paths() if name not in before]
    channel_id = names[0].split("-")[1]
    return tx, rx, Segments.of(channel_id)


CTX = ["fork", "spawn"]


def outcome_of(ctx_name, target, *args, timeout=60):
    return Peer(ctx_name, target, *args).finish(timeout)


# --- the layout ------------------------------------------------------------------------------


def test_layout_offsets_match_a_live_channel():
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        assert shm.read("control", MAGIC, 8) == CONTROL_MAGIC
        assert shm.u32("control", ABI_VERSION) == tensorslab._tensorslab.ABI_VERSION
        assert shm.u32("control", HEADER_SIZE) == CONTROL_BLOCK_SIZE
        assert RING_OFFSET == (CONTROL_BLOCK_SIZE + 63) // 64 * 64
        assert shm.u32("control", CAPACITY) == 4
        assert shm.u64("control", MAX_SLAB_BYTES) == 4 * MiB
        assert shm.u64("control", CONTROL_LEN) == shm.size("control")
        assert shm.u32("control", SEGMENT_COUNT) == 1
        assert shm.u64("control", SEGMENT_RECORDS) == shm.size(0)
        assert shm.u64("control", PROCESSES) & PID_MASK == os.getpid()
        fd = int(shm.path(0).rsplit("/", 1)[1])
        assert shm.u32("control", PROCESSES + PROCESS_SEGMENT_FDS) == fd
        buffer = tx.alloc(100, np.uint8)
        tx.put({"a": buffer}, timeout=10)
        assert (shm.u64("control", RING_HEAD), shm.u64("control", RING_TAIL)) == (0, 1)
        [(segment, offset)] = shm.queued(4)
        assert segment == 0
        assert shm.read(0, offset + HEADER_LEN, 4) == FRAME_MAGIC
        header = shm.read(0, offset, HEADER_LEN)
        assert struct.unpack_from("<Q", header, SIZE_STATE)[0] & 63 == STATE_USED
        frame_bytes = shm.read(0, offset + HEADER_LEN, 32)
        assert struct.unpack_from("<Q", header, CONTENT_LEN)[0] == frame_len(frame_bytes)
        owners = [
            shm.u64(0, block + OWNER) >> OWNER_KIND_SHIFT
            for block, _, state in shm.blocks(0)
            if state
        ]
        assert OWNER_ALLOC in owners, owners
        del buffer
        rx.get(timeout=10)


# --- one corrupt value at a time -------------------------------------------------------------


def queued_message(shm: Segments) -> tuple[int, int]:
    [block] = shm.queued(4)
    return block


@pytest.mark.parametrize("size_wraps", [False, True], ids=["content_len", "and_size_wraps"])
@pytest.mark.parametrize("ctx_name", CTX)
def test_content_length_past_the_block(ctx_name, size_wraps):
    """A block header claiming more content than the block holds (finding 1), also with a
    block size that makes offset + size wrap around to inside the segment (finding 2)."""
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        first = tx.alloc(100, np.uint8)  # keeps the block at offset 0 in use
        tx.put(b"x" * 200, timeout=10)
        segment, offset = block = queued_message(shm)
        assert offset > 0
        # A bytes payload of 1 GiB at the start of the payload area, in a 1 MiB segment.
        stream = bytes([0x0B, 0]) + uvarint(0) + uvarint(0) + uvarint(1 << 30)
        write_frame(shm, block, frame(stream, payload_len=1 << 30))
        if size_wraps:
            shm.put_u64(segment, offset + SIZE_STATE, -offset | STATE_USED)
        got = outcome_of(ctx_name, get_once, rx)
        assert got[:2] == ("raised", "IncompatibleError"), got
        del first


@pytest.mark.parametrize("ctx_name", CTX)
def test_ring_capacity_past_the_control_segment(ctx_name):
    """A capacity (finding 3) that does not match the control segment: a process attaching
    refuses the channel; one attached before keeps the capacity it read then."""
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        tx.put(b"message", timeout=10)
        pickled = pickle.dumps(rx)
        shm.put_u32("control", CAPACITY, 0xFFFF_FFFF)
        # The next cell to pop is then 32 GiB past the ring.
        shm.put_u64("control", RING_HEAD, 1 << 31)
        shm.put_u64("control", RING_TAIL, (1 << 31) + 1)
        if ctx_name == "spawn":
            got = outcome_of(ctx_name, attach_and_get_once, pickled)
            assert got[:2] == ("raised", "IncompatibleError"), got
            assert "capacity" in got[2], got
        else:
            # The fork child shares this process's attachment: cell 2^31 mod 4 is cell 0,
            # which holds the message.
            got = outcome_of(ctx_name, get_once, rx)
            assert got == ("got", b"message"), got
        shm.put_u32("control", CAPACITY, 4)


def test_segment_record_longer_than_the_segment():
    """A slab segment's record claims 64 MiB of a 1 MiB file (finding 4): mapping it
    would give SIGBUS on the first access past 1 MiB."""
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=128 * MiB)
    with tx, rx:
        tx.put(b"message", timeout=10)
        shm.put_u64("control", SEGMENT_RECORDS, 64 * MiB)
        head = shm.u64("control", RING_HEAD)
        shm.put_u64("control", RING_OFFSET + CELL * (head % 4), 2 * MiB)
        got = outcome_of("spawn", attach_and_get_once, pickle.dumps(rx))
        assert got[0] == "raised" and got[1] in ("IncompatibleError", "ShmError"), got
        shm.put_u64("control", SEGMENT_RECORDS, MiB)


def alloc_block(shm: Segments) -> tuple[int, int]:
    [block] = [
        (0, offset)
        for offset, _, state in shm.blocks(0)
        if state == STATE_USED and shm.u64(0, offset + OWNER) >> OWNER_KIND_SHIFT == OWNER_ALLOC
    ]
    return block


@pytest.mark.parametrize("ctx_name", CTX)
def test_location_in_a_block_the_message_does_not_hold(ctx_name):
    """An array located in a used slab block that the frame does not list among the blocks
    it holds (finding 5): its view would outlive that block's owner."""
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        buffer = tx.alloc(256, np.uint8)
        buffer[:] = 7
        tx.put(b"x" * 200, timeout=10)
        other = alloc_block(shm)
        stream = array_of_bytes((link(*other), 0, 256))
        write_frame(shm, queued_message(shm), frame(stream, arrays=1))
        got = outcome_of(ctx_name, get_once, rx)
        assert got[:2] == ("raised", "DecodeError"), got
        del buffer


@pytest.mark.parametrize("ctx_name", CTX)
def test_location_past_an_alloc_block(ctx_name):
    """An `alloc` block's header claims 1 TiB of content and the frame places a 1 GiB
    array in it (finding 5): the location must be checked against the block itself."""
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        buffer = tx.alloc(256, np.uint8)
        buffer[:] = 7
        tx.put({"a": buffer}, timeout=10)
        held = alloc_block(shm)
        stream = array_of_bytes((link(*held), 0, 1 << 30))
        write_frame(shm, queued_message(shm), frame(stream, arrays=1, alloc_blocks=[link(*held)]))
        shm.put_u64(0, held[1] + CONTENT_LEN, 1 << 40)
        got = outcome_of(ctx_name, get_once, rx)
        # Found while rebuilding the value: a DecodeError, naming the block.
        assert got[:2] == ("raised", "DecodeError") and "room for 256" in got[2], got
        shm.put_u64(0, held[1] + CONTENT_LEN, 256)
        del buffer


HOOK_MODULE = """\
# Imported by the decoder (it looks up the named tuple class below) in the middle of a
# message: rewrites a later part of the same message's value stream in shared memory.
import collections
import os

_fd = os.open({path!r}, os.O_RDWR)
os.pwrite(_fd, b"B" * 16, {offset})
os.close(_fd)
Point = collections.namedtuple("Point", "x")
"""


@pytest.mark.parametrize("ctx_name", CTX)
def test_stream_changed_while_it_is_decoded(ctx_name, tmp_path):
    """Decoding reads a private copy of the value stream (finding 6): a write into the
    frame while the decoder runs (here from an import the decoder triggers) changes
    nothing it reads."""
    module = f"tsl_hook_{os.getpid()}_{ctx_name}"
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    with tx, rx:
        tx.put(b"x" * 400, timeout=10)
        segment, offset = block = queued_message(shm)
        point = bytes([0x19, 0x18]) + text(module) + text("Point") + uvarint(1) + b"\x03\x02"
        stream = (
            bytes([0x12])
            + uvarint(2)
            + b"\x07"
            + text("first")
            + point
            + b"\x07"
            + text("second")
            + b"\x07"
            + text("A" * 16)
        )
        data = frame(stream)
        position = offset + HEADER_LEN + data.index(b"A" * 16)
        (tmp_path / f"{module}.py").write_text(
            HOOK_MODULE.format(path=shm.path(segment), offset=position)
        )
        write_frame(shm, block, data)
        got = outcome_of(ctx_name, get_once, rx, str(tmp_path))
        assert got == ("got", {"first": [1], "second": "A" * 16}), got


@pytest.mark.parametrize("word", ["live holder", "no holder"])
def test_lock_word_that_never_unlocks(word):
    tx, rx, shm = new_channel(capacity=4, slab_bytes=MiB, max_slab_bytes=4 * MiB)
    if word == "live holder":
        # This process (slot 0, alive) in its current generation: `lock::Holder`.
        generation = shm.u64("control", PROCESSES) >> 32
        value = (generation & 0x7FFF) << 16 | 1
    else:
        # Held (nonzero) but naming no slot: nothing a waiter could ever judge dead.
        value = 1 << 16
    shm.put_u32("control", RING_LOCK, value)
    try:
        got, hung = outcome_of("fork", get_once, rx, None, 1, timeout=20), None
    except AssertionError as error:
        got, hung = None, str(error)
    finally:
        shm.put_u32("control", RING_LOCK, 0)
        tx.close()
        rx.close()
    # The failure must not keep the channel alive past the test (the leak check).
    del tx, rx
    assert hung is None, hung
    assert got[:2] == ("raised", "Empty"), got


# --- the fuzzer ------------------------------------------------------------------------------

FUZZ_SECONDS = float(os.environ.get("TENSORSLAB_FUZZ_SECONDS", "60"))
#: A child still running this long after its budget has hung (generous: 2 shared cores).
HANG_MARGIN = 45.0

# Parts of the control block to write over, from after the magic and ABI version words.
# The lock words included: one that reads as held by a live process costs each call its
# timeout (see `test_lock_word_that_never_unlocks`), never a hang.
CONTROL_PARTS = [
    (16, RING_HEAD),  # channel id, capacity, flags, max_slab_bytes, control_len, lock words
    (RING_HEAD, RING_STATE_END),  # ring indices and wake-up words
    (SEGMENT_COUNT, SEGMENT_RECORDS),  # heap counters, free-list bitmap and bins
    (SEGMENT_RECORDS, SEGMENT_RECORDS + 4 * SEGMENT_RECORD),  # the first segment records
    (HANDLES, PROCESSES),  # open handle counts, pending handles
    (PROCESSES, PROCESSES + 4 * PROCESS_SLOT),  # the slots the children use
]
SPECIAL_VALUES = [0, 1, 63, 64, 4096, 1 << 20, 1 << 31, (1 << 32) - 1, 1 << 40, 1 << 63]


def random_bytes(rng: random.Random, length: int) -> bytes:
    kind = rng.random()
    if kind < 0.5:
        return rng.randbytes(length)
    value = rng.choice(SPECIAL_VALUES) + rng.choice([-64, -1, 0, 0, 1, 64])
    return struct.pack("<Q", value & 0xFFFF_FFFF_FFFF_FFFF)[:length].ljust(length, b"\0")


def corrupt(rng: random.Random, shm: Segments, capacity: int) -> str:
    """Writes random bytes over one part of the channel; says what it did."""
    region = rng.choice(["control", "cells", "block header", "block header", "frame"])
    length = rng.choice([1, 2, 4, 8, 8, 8, 16])
    data = random_bytes(rng, length)
    if region == "control":
        start, end = rng.choice(CONTROL_PARTS)
        offset = rng.randrange(start, end - length + 1)
        shm.write("control", offset, data)
        return f"control[{offset}:{offset + length}] = {data.hex()}"
    if region == "cells":
        offset = RING_OFFSET + rng.randrange(0, capacity * CELL - length + 1)
        shm.write("control", offset, data)
        return f"control[{offset}:{offset + length}] (ring cells) = {data.hex()}"
    segments = [name for name in shm.paths if name != "control"]
    if not segments:
        return "no slab segment mapped yet"
    if region == "block header":
        segment = rng.choice(segments)
        blocks = shm.blocks(int(segment))
        if not blocks:
            return f"segment {segment}: no block to corrupt"
        block = rng.choice(blocks)[0]
        if length == 8:  # one whole field
            offset = block + 8 * rng.randrange(0, HEADER_LEN // 8)
        else:
            offset = block + rng.randrange(0, HEADER_LEN - length + 1)
        shm.write(segment, offset, data)
        return f"segment {segment}[{offset}:{offset + length}] (header of {block}) = {data.hex()}"
    queued = [(s, o) for s, o in shm.queued(capacity) if str(s) in shm.paths]
    if not queued:
        return "no message queued"
    segment, block = rng.choice(queued)
    offset = block + HEADER_LEN + rng.randrange(0, 96)
    shm.write(segment, offset, data)
    return f"segment {segment}[{offset}:{offset + length}] (frame of {block}) = {data.hex()}"


def fuzz_round(seed: int) -> tuple[list[str], list]:
    """One channel, a producer and a consumer child, random corruption while they run.
    Returns what was written and how each child ended (or raises with the log)."""
    rng = random.Random(seed)
    capacity = rng.choice([1, 4, 16])
    tx, rx, shm = new_channel(capacity=capacity, slab_bytes=MiB, max_slab_bytes=8 * MiB)
    contexts = [rng.choice(CTX), rng.choice(CTX)]
    ready = [mp.get_context(name).Event() for name in contexts]
    peers = [
        Peer(contexts[0], fuzz_producer, tx, rng.getrandbits(32), ready[0]),
        Peer(contexts[1], fuzz_consumer, rx, rng.getrandbits(32), ready[1]),
    ]
    tx.close()
    rx.close()
    log = [
        f"producer[{contexts[0]}] pid {peers[0].pid}, consumer[{contexts[1]}] pid {peers[1].pid}"
    ]
    results = []
    try:
        for event, peer in zip(ready, peers):
            assert event.wait(60), f"{peer.name} never started"
        # Both children are attached (a spawn child attaches through this process): from
        # here on this process holds no part of the channel and only writes into it.
        del tx, rx
        gc.collect()
        started = time.monotonic()
        for moment in sorted(rng.uniform(0, CHILD_BUDGET) for _ in range(rng.randint(2, 12))):
            time.sleep(max(0.0, started + moment - time.monotonic()))
            peer = rng.choice(peers)
            try:
                shm = Segments.of(shm.channel_id, peer.pid)
                if "control" in shm.paths:
                    what = corrupt(rng, shm, capacity)
                    log.append(f"{moment:.2f} s via pid {peer.pid}: {what}")
            except (FileNotFoundError, ProcessLookupError, KeyError):
                pass  # that child is exiting
        deadline = started + CHILD_BUDGET + HANG_MARGIN
        for peer in peers:
            results.append(peer.finish(max(1.0, deadline - time.monotonic())))
    except AssertionError as error:
        for peer in peers:
            if peer.process.is_alive():
                peer.process.kill()
            peer.process.join(30)
        raise AssertionError(
            f"{error}\ncorruption written (seed {seed}):\n  " + "\n  ".join(log)
        ) from None
    for name, result in zip(("producer", "consumer"), results):
        assert not result["foreign"], (
            f"the {name} got an exception that is not tensorslab's (seed {seed}):\n"
            + "\n".join(result["foreign"])
            + "\ncorruption written:\n  "
            + "\n  ".join(log)
        )
    return log, results


def test_corrupt_peer_fuzzer():
    """Random rounds for about FUZZ_SECONDS: every call of every child fails with a
    tensorslab error or succeeds; no child dies of a signal or hangs. Set
    TENSORSLAB_FUZZ_SEED to replay a round (its seed is printed when it fails)."""
    replay = os.environ.get("TENSORSLAB_FUZZ_SEED")
    seeds = [int(replay)] if replay else None
    base = random.randrange(1 << 32)
    end = time.monotonic() + FUZZ_SECONDS
    totals = collections.Counter()
    rounds = 0
    while (seeds is None and time.monotonic() < end) or (seeds and rounds < len(seeds)):
        seed = seeds[rounds] if seeds else base + rounds
        _, results = fuzz_round(seed)
        for result in results:
            totals.update(result["counts"])
        rounds += 1
    print(f"{rounds} rounds from seed {base}: {dict(totals)}")
    assert rounds > 0
