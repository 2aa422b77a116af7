"""Batch calls (`Sender.put_many`, `Receiver.get_many`), the spin setting (`spin_us=`), and
producers woken in groups when a full ring drains: across real processes."""

from __future__ import annotations

import time

import pytest

import batch_children
import tensorslab
from helpers import START_METHODS, Child


@pytest.mark.parametrize("ctx_name", START_METHODS)
def test_batches_across_processes_arrive_once_each_and_in_order(ctx_name):
    tx, rx = tensorslab.channel(capacity=16)
    producers = [
        Child(ctx_name, batch_children.put_many_batches, tx, index, 600, 37).start()
        for index in range(3)
    ]
    tx.close()
    with Child(ctx_name, batch_children.get_many_until_closed, rx, 25) as consumer:
        rx.close()
        for producer in producers:
            with producer:
                assert producer.join() == 600
        got, largest = consumer.join()
    assert sorted(got) == [(p, s) for p in range(3) for s in range(600)]
    for producer in range(3):
        assert [s for p, s in got if p == producer] == list(range(600))
    # get_many took more than one message at a time somewhere (the ring held 16).
    assert largest > 1


def test_get_many_takes_what_is_queued_up_to_the_limit_and_waits_for_the_first():
    tx, rx = tensorslab.channel(capacity=64)
    tx.put_many(range(10))
    assert rx.get_many(4) == [0, 1, 2, 3]
    assert rx.get_many(100) == [4, 5, 6, 7, 8, 9]
    with pytest.raises(tensorslab.Empty):
        rx.get_many(5, timeout=0.05)
    with pytest.raises(tensorslab.Empty):
        rx.get_many(5, block=False)
    with pytest.raises(ValueError, match="max_messages must be at least 1"):
        rx.get_many(0)
    tx.put("last")
    tx.close()
    assert rx.get_many(5) == ["last"]
    with pytest.raises(tensorslab.Closed):
        rx.get_many(5, timeout=1)
    rx.close()


def test_put_many_that_cannot_encode_one_puts_nothing_and_names_it():
    tx, rx = tensorslab.channel(capacity=8, strict=True)
    with pytest.raises(tensorslab.EncodeError, match=r"objs\[2\]"):
        tx.put_many([1, 2, object(), 4])
    assert rx.qsize() == 0
    assert tx.stats()["messages_in_flight"] == 0
    tx.put_many([5])
    assert rx.get_many(10) == [5]
    tx.close()
    rx.close()


def test_put_many_into_a_full_ring_says_how_many_it_put():
    tx, rx = tensorslab.channel(capacity=4)
    with pytest.raises(tensorslab.Full) as raised:
        tx.put_many(range(10), timeout=0.05)
    assert raised.value.sent == 4
    assert any("4 of 10" in note for note in raised.value.__notes__)
    with pytest.raises(tensorslab.Full) as raised:
        tx.put_many(["x"], block=False)
    assert raised.value.sent == 0
    assert rx.get_many(10) == [0, 1, 2, 3]
    assert tx.stats()["messages_in_flight"] == 0
    tx.close()
    rx.close()


def test_a_message_that_fails_to_decode_mid_batch_loses_none_of_the_others():
    tx, rx = tensorslab.channel(capacity=8)
    tx.put_many([1, 2, batch_children.Explodes(), 4, 5])
    # The ones before it come first; the failure is the next call's; then the rest.
    assert rx.get_many(10) == [1, 2]
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        rx.get_many(10)
    assert rx.get() == 4
    assert rx.get_many(10) == [5]
    assert tx.stats()["messages_in_flight"] == 0
    tx.close()
    rx.close()


def test_closing_a_receiver_gives_back_what_a_failed_batch_kept():
    tx, rx = tensorslab.channel(capacity=8)
    tx.put_many([1, batch_children.Explodes(), 3, 4])
    assert rx.get_many(10) == [1]
    # The error and messages 3 and 4 wait in the receiver; closing it releases them.
    rx.close()
    assert tx.stats()["messages_in_flight"] == 0
    tx.close()


def test_a_producer_blocked_on_a_full_ring_gets_in_after_one_get():
    """Producers asleep on a full ring are woken in groups (once a quarter is free); one that
    the group wake-up leaves asleep still gets in after a single get, within its timeout."""
    tx, rx = tensorslab.channel(capacity=64)
    tx.put_many(range(64))
    with Child("spawn", batch_children.put_blocked_until_room, tx, 30) as child:
        tx.close()
        # Let the child start and fall asleep on the full ring (a wait, not an assertion).
        time.sleep(3)
        assert rx.qsize() == 64
        assert rx.get() == 0
        assert child.join() is True
    assert rx.get_many(100) == list(range(1, 64)) + ["after the ring was full"]
    rx.close()


@pytest.mark.parametrize("ctx_name", START_METHODS)
def test_spin_us_is_the_channels_in_every_process(ctx_name):
    tx, rx = tensorslab.channel(capacity=4, spin_us=250)
    assert rx.stats()["spin_us"] == pytest.approx(250)
    with Child(ctx_name, batch_children.channel_spin, rx) as child:
        rx.close()
        assert child.join() == pytest.approx(250)
    tx.close()
    _, rx2 = tensorslab.channel(capacity=4)
    assert rx2.stats()["spin_us"] == pytest.approx(20)
    rx2.close()


@pytest.mark.parametrize("bad", [-1, 2e6, float("nan"), float("inf")])
def test_spin_us_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="spin_us must be between 0 and 1000000"):
        tensorslab.channel(spin_us=bad)
