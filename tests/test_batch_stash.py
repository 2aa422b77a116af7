"""`Sender.put_many` and `Receiver.get_many`: every message once and in order, including
the messages a `get_many` took and keeps for the next call (the stash, after a message
that fails to decode), across threads and fork children."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

import stash_children
import tensorslab
from helpers import Child, run_in_child
from stash_children import Paused, Refused


def drain(rx) -> list:
    """Everything left, in order: values, or the name of the error a `get` raised."""
    out = []
    while True:
        try:
            out.append(rx.get(timeout=0.2))
        except tensorslab.Empty:
            return out
        except tensorslab.DecodeError as error:
            out.append(("DecodeError", str(error).rsplit(": ", 1)[-1]))


def test_a_message_that_fails_to_decode_waits_with_its_error_for_the_next_call():
    tx, rx = tensorslab.channel(16)
    tx.put_many(["a", Refused("r"), "b", "c"])
    assert rx.get_many(8, timeout=5) == ["a"]
    with pytest.raises(tensorslab.DecodeError, match="r cannot be rebuilt"):
        rx.get_many(8, timeout=5)
    assert rx.get_many(8, timeout=5) == ["b", "c"]
    assert rx.stats()["messages_in_flight"] == 0
    tx.close()
    rx.close()


def test_two_threads_with_stashes_lose_nothing():
    # Thread A's batch is [paused, refused, "x1"]; while A decodes `paused` (GIL released),
    # B takes ["y0", refused, "y1"] and stashes its error and "y1". A then stashes its
    # own error and "x1": the stash B left must survive that. It did not: A's leftovers
    # replaced it, so "y1" was never delivered and its block never freed.
    stash_children.DECODING.clear()
    stash_children.RESUME.clear()
    tx, rx = tensorslab.channel(16)
    tx.put_many([Paused("p"), Refused("ra"), "x1"])
    got_a = []
    thread = threading.Thread(target=lambda: got_a.extend(rx.get_many(64, timeout=10)))
    thread.start()
    try:
        assert stash_children.DECODING.wait(10)
        tx.put_many(["y0", Refused("rb"), "y1"])
        got_b = rx.get_many(64, timeout=10)
    finally:
        stash_children.RESUME.set()
        thread.join(10)
    assert got_a == ["p"] and got_b == ["y0"]
    rest = drain(rx)
    values = [item for item in rest if isinstance(item, str)]
    errors = sorted(item[1] for item in rest if isinstance(item, tuple))
    assert sorted(values) == ["x1", "y1"], rest
    assert errors == ["ra cannot be rebuilt here", "rb cannot be rebuilt here"], rest
    assert rx.stats()["messages_in_flight"] == 0
    tx.close()
    rx.close()


def _stash_in_parent():
    """A channel whose receiver holds a stash (an error, then "b") and has "fresh" queued."""
    tx, rx = tensorslab.channel(16)
    tx.put_many(["a", Refused("r"), "b"])
    assert rx.get_many(8, timeout=5) == ["a"]
    tx.put("fresh")
    return tx, rx


@pytest.mark.parametrize("how", ["os.fork", "multiprocessing-fork", "forkserver", "preexec_fn"])
def test_a_fork_child_never_delivers_its_parents_stash(how):
    # The stash belongs to the process that took it (by its cached pid): a child that saw
    # the parent's pid would deliver the parent's messages a second time.
    tx, rx = _stash_in_parent()
    if how in ("multiprocessing-fork", "forkserver"):
        context = "fork" if how == "multiprocessing-fork" else "forkserver"
        seen = run_in_child(context, stash_children.next_value, rx)
    else:
        read_end, write_end = os.pipe()
        try:
            if how == "os.fork":
                pid = os.fork()
                if pid == 0:
                    try:
                        stash_children.next_value_to_fd(rx, write_end)
                    finally:
                        os._exit(0)
                os.waitpid(pid, 0)
            else:
                subprocess.run(
                    [sys.executable, "-c", "pass"],
                    preexec_fn=lambda: stash_children.next_value_to_fd(rx, write_end),
                    pass_fds=(write_end,),
                    check=True,
                    timeout=60,
                )
            os.close(write_end)
            write_end = -1
            seen = os.read(read_end, 4096).decode()
        finally:
            os.close(read_end)
            if write_end >= 0:
                os.close(write_end)
    assert seen == "'fresh'"
    # And the parent still has its stash, in order.
    assert drain(rx) == [("DecodeError", "r cannot be rebuilt here"), "b"]
    tx.close()
    rx.close()


def test_put_many_names_how_many_were_put_when_the_ring_fills():
    tx, rx = tensorslab.channel(2)
    with pytest.raises(tensorslab.Full) as raised:
        tx.put_many(["a", "b", "c"], block=False)
    assert raised.value.sent == 2
    assert rx.get_many(8, timeout=5) == ["a", "b"]
    tx.close()
    rx.close()


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_get_many_across_processes_is_exactly_once_and_in_order(context):
    tx, rx = tensorslab.channel(8)
    got = []
    with Child(context, stash_children.put_numbers, tx, 500):
        while len(got) < 500:
            got.extend(rx.get_many(32, timeout=30))
    assert got == list(range(500))
    tx.close()
    rx.close()


def test_a_receiver_closed_while_another_thread_decodes_its_batch_frees_the_rest():
    # The batch's leftovers ("x1" after a failed decode) come back after `close()` released
    # the stash: they are freed then, not kept in a stash nobody will read.
    stash_children.DECODING.clear()
    stash_children.RESUME.clear()
    tx, rx = tensorslab.channel(16)
    tx.put_many([Paused("p"), Refused("r"), "x1"])
    outcome = []
    thread = threading.Thread(target=lambda: outcome.extend(rx.get_many(64, timeout=10)))
    thread.start()
    try:
        assert stash_children.DECODING.wait(10)
        rx.close()
    finally:
        stash_children.RESUME.set()
        thread.join(10)
    assert outcome == ["p"]
    assert tx.stats()["messages_in_flight"] == 0
    tx.close()


def test_get_many_on_a_ring_a_corrupt_peer_overfilled_takes_at_most_a_ring():
    # It sized its list by the ring's length as shared memory says (2**40 cells: the
    # allocation failed and the process aborted) and popped until `max_messages`.
    # (What the cells past the real message decode to is the corrupt peer's doing: zeroed
    # cells name the slab's first block, so they may repeat it.)
    first, after = run_in_child("fork", stash_children.get_many_past_a_corrupt_tail, timeout=60)
    assert first[0] == "real" and len(first) <= 8
    assert after in ("IncompatibleError", "Empty", "returned")


def test_ctrl_c_in_a_put_many_waiting_for_room_says_how_many_were_put():
    # The fifth put waits for room; Ctrl-C (SIGINT from a timer) ends it: the four before it
    # arrive once each, the rest never.
    tx, rx = tensorslab.channel(4)
    previous = signal.signal(signal.SIGALRM, lambda *_: signal.raise_signal(signal.SIGINT))
    signal.setitimer(signal.ITIMER_REAL, 0.2)
    try:
        with pytest.raises(KeyboardInterrupt) as raised:
            tx.put_many(range(10), timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert raised.value.sent == 4
    assert drain(rx) == [0, 1, 2, 3]
    assert rx.stats()["messages_in_flight"] == 0
    tx.close()
    rx.close()


def test_four_producers_and_two_consumers_batching_lose_and_repeat_nothing():
    # A ring of 4 cells shared by six processes: quick attempts keep finding the ring lock
    # taken or the ring full and retry normally; a retry must not leave a message counted,
    # queued or held twice.
    tx, rx = tensorslab.channel(4)
    producers = [Child("fork", stash_children.put_tagged, tx, index, 300) for index in range(4)]
    consumer = Child("fork", stash_children.get_many_until_closed, rx)
    for child in [*producers, consumer]:
        child.start()
    tx.close()
    mine = stash_children.get_many_until_closed(rx)
    for child in producers:
        assert child.join() == 300
    theirs = consumer.join()
    for taken in (mine, theirs):
        for producer in range(4):
            seqs = [seq for who, seq in taken if who == producer]
            assert seqs == sorted(seqs), "one consumer saw a producer's messages out of order"
    assert sorted(mine + theirs) == [(p, s) for p in range(4) for s in range(300)]
    assert rx.stats()["messages_in_flight"] == 0
    assert rx.stats()["unacknowledged"] == 0
    rx.close()
