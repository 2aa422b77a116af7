"""Functions that tests run in child processes (see `helpers.Child`).

They live in an importable module so that `spawn` and `forkserver` children can find them
by name. Each returns a picklable result (the parent gets it from `Child.join`); every
blocking call has a timeout so a child never outlives its test.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import numpy as np

import samples
import tensorslab
from child_runner import run_and_report  # noqa: F401  (re-exported: the entry point)

GET_TIMEOUT = 60


# --- round trips ---------------------------------------------------------------------------


def echo_samples(kind, rx, tx):
    """Receive (name, value) pairs, compare each with this process's own copy of the sample,
    and send (name, value, differences, read-only leaves) back; return the count."""
    expected = samples.build(kind)
    count = 0
    for name, value in iter_until_closed(rx):
        diffs = samples.differences(value, expected[name], name)
        read_only = [
            f"{name}: received ndarray is read-only"
            for leaf in samples.leaves(value)
            if isinstance(leaf, np.ndarray) and not leaf.flags.writeable
        ]
        tx.put((name, value, diffs + read_only), timeout=GET_TIMEOUT)
        del value
        count += 1
    tx.close()
    rx.close()
    return count


def iter_until_closed(rx, timeout=GET_TIMEOUT):
    """Like `iter(rx)`, but every wait is bounded."""
    while True:
        try:
            yield rx.get(timeout=timeout)
        except tensorslab.Closed:
            return


# --- producers and consumers ---------------------------------------------------------------


def produce(tx, producer, count, close=True):
    """Put `count` messages {"producer", "seq"}; close the handle unless told not to."""
    for seq in range(count):
        tx.put({"producer": producer, "seq": seq, "data": np.full(16, seq)}, timeout=GET_TIMEOUT)
    if close:
        tx.close()
    return count


def produce_with_payload(tx, producer, count, seed):
    """Messages of random sizes (64 B .. 256 KiB), each with a checksum of its payload."""
    rng = np.random.default_rng(seed)
    for seq in range(count):
        payload = rng.integers(0, 256, size=int(rng.integers(64, 256 << 10)), dtype=np.uint8)
        tx.put(
            {"producer": producer, "seq": seq, "payload": payload, "sum": int(payload.sum())},
            timeout=GET_TIMEOUT,
        )
    tx.close()
    return count


def consume(rx):
    """Receive until Closed; return the (producer, seq) ids in arrival order and any
    message whose checksum did not match."""
    got = []
    corrupt = []
    for message in iter_until_closed(rx):
        got.append((message["producer"], message["seq"]))
        if "payload" in message and int(message["payload"].sum()) != message["sum"]:
            corrupt.append(got[-1])
        del message
    rx.close()
    return got, corrupt


def produce_then_exit(tx, count):
    """Put `count` messages and leave without closing anything (no atexit, no gc)."""
    produce(tx, producer=0, count=count, close=False)
    os._exit(0)


def produce_then_hang(tx, count):
    """Put `count` messages, then wait to be killed."""
    produce(tx, producer=0, count=count, close=False)
    time.sleep(600)


def produce_from_queue(queue, count):
    tx = queue.get(timeout=GET_TIMEOUT)
    return produce(tx, producer=0, count=count)


def get_from_queue(queue):
    return queue.get(timeout=GET_TIMEOUT)


def consume_from_queue(queue):
    rx = queue.get(timeout=GET_TIMEOUT)
    return consume(rx)


def receive_some_then_close(rx, count):
    """Take `count` messages, then close the receiver and exit."""
    taken = [rx.get(timeout=GET_TIMEOUT)["seq"] for _ in range(count)]
    rx.close()
    return taken


def produce_stamped(tx, count, nbytes):
    """`count` messages of `nbytes` each; byte 0 and the last byte carry the message number,
    the rest a fixed pattern."""
    data = (np.arange(nbytes, dtype=np.uint64) % 251).astype(np.uint8)
    for i in range(count):
        data[0] = data[-1] = i % 256
        tx.put({"i": i, "data": data}, timeout=GET_TIMEOUT)
    tx.close()
    return count


def produce_filled(tx, count, shape):
    """Message i holds an array and a tensor filled with i."""
    import torch

    for i in range(count):
        tx.put(
            {"i": i, "array": np.full(shape, i, dtype=np.float32), "tensor": torch.full(shape, i)},
            timeout=GET_TIMEOUT,
        )
    tx.close()
    return count


def consume_and_drop(rx):
    """Take every message and drop it at once; return how many."""
    count = 0
    for message in iter_until_closed(rx):
        del message  # not held while waiting for the next one
        count += 1
    rx.close()
    return count


# --- Queue ---------------------------------------------------------------------------------


def queue_worker(inbox, outbox):
    """mp.Queue-style worker: double each value until a None sentinel, answer None, then
    wait for the parent's "done" before exiting (torch tensors sent through an mp.Queue
    are fetched from the sending process, which must still be alive)."""
    handled = 0
    while True:
        item = inbox.get(timeout=GET_TIMEOUT)
        if item is None:
            break
        index, value = item
        outbox.put((index, value * 2))
        handled += 1
    outbox.put(None)
    assert inbox.get(timeout=GET_TIMEOUT) == "done"
    return handled


# --- codec fuzzing -------------------------------------------------------------------------


def fuzz_loads(valid_messages, seed, random_count):
    """Feed loads() random bytes, every truncation and random mutations of valid messages.

    Returns (failures, decoded_mutations): failures are inputs that raised something other
    than DecodeError, or (for random bytes and truncations, which are never valid) decoded.
    A crash of this process shows up in the parent as a bad exit code.
    """
    rng = random.Random(seed)
    failures = []

    def expect_error(data, what):
        try:
            tensorslab.loads(data)
        except tensorslab.DecodeError:
            return
        except BaseException as error:  # anything else is a finding
            failures.append(f"{what}: {type(error).__name__}: {error} (input {data[:64]!r})")
            return
        failures.append(f"{what}: decoded without error (input {data[:64]!r})")

    for i in range(random_count):
        data = rng.randbytes(rng.choice([0, 1, 2, 3, 4, 8, 16, 64, 256, 4096]))
        expect_error(data, f"random input {i}")
    for index, message in enumerate(valid_messages):
        for end in range(len(message)):
            expect_error(message[:end], f"message {index} truncated to {end} of {len(message)}")
    decoded = 0
    for index, message in enumerate(valid_messages):
        for attempt in range(500):
            data = bytearray(message)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                tensorslab.loads(bytes(data))
                decoded += 1
            except tensorslab.DecodeError:
                pass
            except BaseException as error:
                failures.append(
                    f"message {index} mutation {attempt}: {type(error).__name__}: {error}"
                )
    return failures, decoded


# --- signals -------------------------------------------------------------------------------


def keyboard_interrupt_during_get():
    """Under Python's default SIGINT handler, a blocked get raises KeyboardInterrupt and the
    channel still works afterwards."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    tx, rx = tensorslab.channel()
    timer = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        rx.get(timeout=30)
        return "get returned instead of being interrupted"
    except KeyboardInterrupt:
        pass
    except tensorslab.Empty:
        return "get waited out its timeout instead of being interrupted"
    finally:
        timer.join()
    tx.put({"a": np.arange(3)}, timeout=10)
    assert np.array_equal(rx.get(timeout=10)["a"], np.arange(3))
    tx.close()
    rx.close()
    return "interrupted"
