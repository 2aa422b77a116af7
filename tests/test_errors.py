"""Bad input raises the documented exception, says what and where, allocates nothing that
stays allocated, and leaves the channel usable; signals interrupt blocked calls."""

from __future__ import annotations

import contextlib
import gc
import os
import pickle
import queue
import signal
import threading

import numpy as np
import pytest

import children
import tensorslab
from helpers import run_in_child
from samples import Plain, Record

MiB = 1 << 20


def used(handle) -> int:
    gc.collect()
    return handle.stats()["slab_used_bytes"]


def still_works(tx, rx) -> None:
    """The channel carries a message with an array after an error."""
    tx.put({"after": "error", "a": np.arange(5)}, timeout=10)
    got = rx.get(timeout=10)
    assert got["after"] == "error" and np.array_equal(got["a"], np.arange(5))
    del got
    assert used(rx) == 0


def mentions_size(message: str, nbytes: int) -> bool:
    """`message` gives `nbytes` as a byte count or in binary units (`16 MiB`, `16.0 MiB`)."""
    forms = {str(nbytes), f"{nbytes:,}"}
    for unit, scale in (("KiB", 1 << 10), ("MiB", 1 << 20), ("GiB", 1 << 30)):
        value = nbytes / scale
        forms |= {f"{value:.1f} {unit}", f"{value:.2f} {unit}", f"{value:g} {unit}"}
    return any(form in message for form in forms)


def test_exception_hierarchy():
    error = tensorslab.TensorslabError
    assert issubclass(tensorslab.Full, error) and issubclass(tensorslab.Full, queue.Full)
    assert issubclass(tensorslab.Empty, error) and issubclass(tensorslab.Empty, queue.Empty)
    assert issubclass(tensorslab.Closed, error) and not issubclass(tensorslab.Closed, queue.Empty)
    assert issubclass(tensorslab.PeerGone, tensorslab.Closed)
    assert issubclass(tensorslab.EncodeError, error) and issubclass(
        tensorslab.EncodeError, TypeError
    )
    assert issubclass(tensorslab.DecodeError, error)
    assert issubclass(tensorslab.DecodeError, ValueError)
    assert issubclass(tensorslab.IncompatibleError, error)
    assert issubclass(tensorslab.ShmError, error) and issubclass(tensorslab.ShmError, OSError)


def test_strict_refusal_names_the_path():
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put({"warmup": np.ones(10)}, timeout=10)
        rx.get(timeout=10)
        with pytest.raises(tensorslab.EncodeError) as caught:
            tx.put({"batch": [np.ones(1 << 16), 2, 3, Plain(1, 2)]}, timeout=10)
        message = str(caught.value)
        assert "'batch'" in message and "[3]" in message, message
        assert "Plain" in message and "strict" in message, message
        assert used(tx) == 0, "the failed put left its allocation behind"
        still_works(tx, rx)


def test_strict_refusal_names_attribute_paths():
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        with pytest.raises(tensorslab.EncodeError) as caught:
            tx.put({"batch": [Record("r", [0, Plain(0, 0)])]}, timeout=10)
        message = str(caught.value)
        assert "'batch'" in message and "values" in message and "[1]" in message, message
        still_works(tx, rx)


def test_unpicklable_object_fails_cleanly():
    tx, rx = tensorslab.channel()
    with tx, rx:
        with pytest.raises((tensorslab.EncodeError, pickle.PicklingError, AttributeError)):
            tx.put([np.ones(1 << 16), lambda: None], timeout=10)
        assert used(tx) == 0, "the failed put left its allocation behind"
        still_works(tx, rx)


def test_message_larger_than_max_slab_bytes():
    limit, size = 8 * MiB, 16 * MiB
    tx, rx = tensorslab.channel(max_slab_bytes=limit)
    with tx, rx:
        assert tx.has_space() and tx.has_space(MiB)
        assert not tx.has_space(size)
        with pytest.raises(ValueError) as caught:
            tx.put({"big": np.zeros(size, dtype=np.uint8)}, timeout=30)
        assert not isinstance(caught.value, queue.Full)
        message = str(caught.value)
        assert mentions_size(message, size) and mentions_size(message, limit), message
        assert used(tx) == 0
        still_works(tx, rx)


def test_ring_full():
    tx, rx = tensorslab.channel(capacity=2)
    with tx, rx:
        tx.put(1, timeout=10)
        tx.put(2, timeout=10)
        assert not tx.has_space()
        with pytest.raises(tensorslab.Full):
            tx.put_nowait(3)
        with pytest.raises(queue.Full):
            tx.put(3, timeout=0.05)
        with pytest.raises(tensorslab.Full):
            tx.put(3, block=False)
        assert rx.get(timeout=10) == 1
        tx.put(3, timeout=10)
        assert [rx.get(timeout=10), rx.get(timeout=10)] == [2, 3]


def test_slab_full_says_what_is_held():
    tx, rx = tensorslab.channel(capacity=64, slab_bytes=16 * MiB, max_slab_bytes=16 * MiB)
    with tx, rx:
        sent = 0
        with pytest.raises(tensorslab.Full) as caught:
            for _ in range(10):
                tx.put(np.zeros(4 * MiB, dtype=np.uint8), timeout=0.05)
                sent += 1
        assert 1 <= sent < 10
        message = str(caught.value)
        assert "unreleased" in message and str(sent) in message, message
        assert not tx.has_space(4 * MiB)
        for _ in range(sent):
            rx.get(timeout=10)
        assert used(rx) == 0
        tx.put(np.zeros(4 * MiB, dtype=np.uint8), timeout=10)
        rx.get(timeout=10)
        still_works(tx, rx)


def test_empty():
    tx, rx = tensorslab.channel()
    with tx, rx:
        with pytest.raises(tensorslab.Empty):
            rx.get_nowait()
        with pytest.raises(queue.Empty):
            rx.get(timeout=0.05)
        with pytest.raises(tensorslab.Empty):
            rx.get(block=False)
        still_works(tx, rx)


def test_loads_refuses_pickle_unless_allowed():
    data = tensorslab.dumps({"x": Plain(1, [2])})
    with pytest.raises(tensorslab.DecodeError, match="allow_pickle"):
        tensorslab.loads(data)
    assert tensorslab.loads(data, allow_pickle=True) == {"x": Plain(1, [2])}


def test_loads_garbage():
    for data in (b"", b"\x00", b"not a tensorslab message", bytes(1000)):
        with pytest.raises(tensorslab.DecodeError):
            tensorslab.loads(data)


def test_bad_channel_arguments():
    with pytest.raises(ValueError):
        tensorslab.channel(capacity=0)
    with pytest.raises(ValueError):
        tensorslab.channel(max_slab_bytes=0)
    with pytest.raises(ValueError):
        tensorslab.channel(slab_bytes=64 * MiB, max_slab_bytes=16 * MiB)


# --- signals -------------------------------------------------------------------------------


class Interrupted(Exception):
    """Raised by the test's SIGINT handler; the blocked call must let it through."""


@contextlib.contextmanager
def sigint_after(delay: float):
    def handler(signum, frame):
        raise Interrupted

    previous = signal.signal(signal.SIGINT, handler)
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        timer.join()
        signal.signal(signal.SIGINT, previous)


def test_signal_interrupts_blocked_get():
    tx, rx = tensorslab.channel()
    with tx, rx:
        with pytest.raises(Interrupted), sigint_after(0.2):
            rx.get(timeout=30)
        still_works(tx, rx)


def test_signal_interrupts_blocked_put():
    tx, rx = tensorslab.channel(capacity=1)
    with tx, rx:
        tx.put(0, timeout=10)
        with pytest.raises(Interrupted), sigint_after(0.2):
            tx.put(1, timeout=30)
        assert rx.get(timeout=10) == 0
        with pytest.raises(tensorslab.Empty):
            rx.get_nowait()  # the interrupted put sent nothing
        still_works(tx, rx)


def test_signal_interrupts_wait_for_all_ack():
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(np.ones(100), timeout=10)
        with pytest.raises(Interrupted), sigint_after(0.2):
            tx.wait_for_all_ack(timeout=30)
        rx.get(timeout=10)
        gc.collect()
        assert tx.wait_for_all_ack(timeout=10)
        still_works(tx, rx)


def test_keyboard_interrupt_in_a_child_leaves_channel_usable():
    """The default handler: KeyboardInterrupt from a blocked get, in a child process so a
    library that ignores signals cannot take the test session down with it."""
    assert run_in_child("fork", children.keyboard_interrupt_during_get) == "interrupted"


class _RaisesWhilePickled:
    def __init__(self, error: BaseException) -> None:
        self.error = error

    def __reduce__(self):
        raise self.error


@pytest.mark.parametrize("error_type", [KeyboardInterrupt, SystemExit])
def test_ctrl_c_or_exit_while_pickling_is_not_turned_into_an_encode_error(error_type):
    """A KeyboardInterrupt or SystemExit raised while the encoder pickles part of a message
    propagates as itself (it was wrapped as EncodeError, so Ctrl-C or sys.exit() in a
    __reduce__ became an error about the value); the channel stays usable."""
    tx, rx = tensorslab.channel()
    with tx, rx:
        # A fresh exception: a parameter's instance would keep this frame (and the
        # channel) alive through its traceback after the test.
        with pytest.raises(error_type):
            tx.put({"x": _RaisesWhilePickled(error_type())})
        tx.put("after")
        assert rx.get(timeout=10) == "after"
        assert rx.qsize() == 0
