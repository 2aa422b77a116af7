"""`tensorslab.multiprocessing.Pipe`: the behaviours of CPython's `_TestConnection`,
`_TestPoll` and `TestWait` (`Lib/test/_test_multiprocessing.py`), across fork and spawn
children, and what arrives lying in a slab segment of the receiver (`mp_children.in_slab`).
"""

from __future__ import annotations

import array
import multiprocessing
import multiprocessing.connection
import os
import signal

import numpy as np
import pytest

import mp_children
import tensorslab.multiprocessing as tmp
from helpers import Child

METHODS = ("fork", "spawn")
WAIT = 60


# --- Pipe (_TestConnection, _TestPoll, TestWait) --------------------------------------------

# The tests that hold for both run against both: a difference shows as one of a pair failing.
PIPES = {"multiprocessing": multiprocessing.Pipe, "tensorslab": tmp.Pipe}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("kind", list(PIPES))
def test_connection(kind, method):
    conn, child_conn = PIPES[kind]()
    with Child(method, mp_children.echo_bytes_until_empty, child_conn) as child:
        assert type(conn.fileno()) is int
        seq = [1, 2.25, None]
        assert conn.send(seq) is None
        assert conn.recv() == seq  # the child echoed it as bytes: they unpickle, as in stdlib
        msg = b"hello world"
        assert conn.send_bytes(msg) is None
        assert conn.recv_bytes() == msg

        arr = array.array("i", range(4))
        buffer = array.array("i", [0] * 10)
        conn.send_bytes(arr)
        assert conn.recv_bytes_into(buffer) == len(arr) * buffer.itemsize
        assert list(buffer) == list(arr) + [0] * 6
        buffer = array.array("i", [0] * 10)
        conn.send_bytes(arr)
        assert conn.recv_bytes_into(buffer, 3 * buffer.itemsize) == len(arr) * buffer.itemsize
        assert list(buffer) == [0] * 3 + list(arr) + [0] * 3
        conn.send_bytes(msg * 10)
        with pytest.raises(multiprocessing.BufferTooShort) as too_short:
            conn.recv_bytes_into(bytearray(40))
        assert too_short.value.args == (msg * 10,)

        assert conn.poll() is False
        assert conn.poll(-1) is False
        assert conn.poll(0.05) is False
        conn.send(None)
        assert conn.poll(WAIT) is True
        assert conn.recv() is None

        really_big = b"X" * (16 * 1024 * 1024)
        conn.send_bytes(really_big)
        assert conn.recv_bytes() == really_big
        conn.send_bytes(b"")  # tells the child to quit
        child_conn.close()
        child.join()
    assert conn.readable and conn.writable
    with pytest.raises(EOFError):
        conn.recv()
    with pytest.raises(EOFError):
        conn.recv_bytes()
    conn.close()


@pytest.mark.parametrize("kind", list(PIPES))
def test_duplex_false(kind):
    reader, writer = PIPES[kind](duplex=False)
    assert writer.send(1) is None
    assert reader.recv() == 1
    assert (reader.readable, reader.writable, writer.readable, writer.writable) == (
        True,
        False,
        False,
        True,
    )
    for call in (lambda: reader.send(2), writer.recv, writer.poll, lambda: reader.send_bytes(b"")):
        with pytest.raises(OSError):
            call()


@pytest.mark.parametrize("kind", list(PIPES))
def test_send_bytes_offsets_and_sizes(kind):
    msg = b"abcdefghijklmnopqrstuvwxyz"
    a, b = PIPES[kind]()
    for args, expected in (
        ((), msg),
        ((5,), msg[5:]),
        ((7, 8), msg[7:15]),
        ((26,), b""),
        ((26, 0), b""),
    ):
        a.send_bytes(msg, *args)
        assert b.recv_bytes() == expected
    for args in ((27,), (22, 5), (26, 1), (-1,), (4, -1)):
        with pytest.raises(ValueError):
            a.send_bytes(msg, *args)


@pytest.mark.parametrize("kind", list(PIPES))
def test_recv_bytes_maxlength_and_pickled_objects(kind):
    a, b = PIPES[kind]()
    a.send_bytes(b"12345")
    with pytest.raises(OSError, match="bad message length"):
        b.recv_bytes(4)
    assert not b.readable  # as the standard library's: a bad length ends reading
    c, d = PIPES[kind]()
    c.send(list(range(100)))  # an object whose pickle is longer than maxlength
    with pytest.raises(OSError, match="bad message length"):
        d.recv_bytes(10)
    e, f = PIPES[kind]()
    e.send({"k": [1, 2]})
    assert multiprocessing.reduction.ForkingPickler.loads(f.recv_bytes()) == {"k": [1, 2]}
    e.send_bytes(multiprocessing.reduction.ForkingPickler.dumps(("raw", 3)))
    assert f.recv() == ("raw", 3)


@pytest.mark.parametrize("kind", list(PIPES))
def test_context_manager_closes(kind):
    a, b = PIPES[kind]()
    with a, b:
        a.send(1729)
        assert b.recv() == 1729
        assert not a.closed and not b.closed
    assert a.closed and b.closed
    for call in (a.recv, b.recv, lambda: a.send(1)):
        with pytest.raises(OSError):
            call()


@pytest.mark.parametrize("kind", list(PIPES))
def test_poll_empty_string_and_message_boundaries(kind):
    a, b = PIPES[kind]()
    assert a.poll() is False
    b.send_bytes(b"")
    assert a.poll() is True and a.poll() is True
    assert a.recv_bytes() == b""
    for data in (b"a", b"b", b"cd"):
        b.send_bytes(data)
    b.send([np.arange(2)])
    assert a.recv_bytes() == b"a"
    assert a.poll(1.0) and a.poll(0.0)
    assert a.recv_bytes() == b"b"
    assert a.recv_bytes() == b"cd"
    got = a.recv()
    assert np.array_equal(got[0], np.arange(2))


@pytest.mark.parametrize("method", METHODS)
def test_poll_strings_from_a_child(method):
    strings = (b"hello", b"", b"a", b"b", b"", b"bye", b"", b"lop")
    a, b = tmp.Pipe()
    with Child(method, mp_children.send_strings, b, strings):
        b.close()
        for data in strings:
            assert a.poll(WAIT)
            assert a.recv_bytes() == data
    with pytest.raises(EOFError):
        a.recv_bytes()


@pytest.mark.parametrize("method", METHODS)
def test_wait_on_many_pipes_until_eof(method):
    readers, children = [], []
    for _ in range(2):
        r, w = tmp.Pipe(duplex=False)
        children.append(Child(method, mp_children.send_ten_then_close, w).start())
        w.close()
        readers.append(r)
    messages = []
    while readers:
        ready = multiprocessing.connection.wait(readers, timeout=WAIT)
        assert ready, "no pipe became ready"
        for r in ready:
            try:
                i, pid, values = r.recv()
            except EOFError:
                readers.remove(r)
                r.close()
            else:
                assert np.array_equal(values, np.full(100, i)) and mp_children.array_in_slab(values)
                messages.append((i, pid))
                del values
    for child in children:
        child.join()
    assert sorted(messages) == sorted((i, child.pid) for i in range(10) for child in children)
    for child in children:  # each sender's messages in the order it sent them
        assert [i for i, pid in messages if pid == child.pid] == list(range(10))


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_sending_on_one_end_each_message_arrives_once_in_order(method):
    r, w = tmp.Pipe(duplex=False)
    children = [Child(method, mp_children.send_ten_then_close, w).start() for _ in range(2)]
    w.close()
    messages = []
    while True:
        assert r.poll(WAIT), "neither sender sent or closed"
        try:
            i, pid, values = r.recv()
        except EOFError:
            break
        assert np.array_equal(values, np.full(100, i))
        messages.append((i, pid))
        del values
    for child in children:
        child.join()
        assert [i for i, pid in messages if pid == child.pid] == list(range(10))
    assert len(messages) == 20


@pytest.mark.parametrize("method", METHODS)
def test_recv_after_the_peer_was_killed_gives_eof(method):
    a, b = tmp.Pipe()
    with Child(method, mp_children.send_then_die, b, 3) as child:
        b.close()
        got = [a.recv() for _ in range(3)]
        with pytest.raises(EOFError):
            a.recv()
        child.join(expect_exitcode=-signal.SIGKILL)
    assert [m["i"] for m in got] == [0, 1, 2]
    assert all(np.array_equal(m["a"], np.arange(m["i"] + 1)) for m in got)
    with pytest.raises(BrokenPipeError):
        a.send("nobody reads this")


@pytest.mark.parametrize("method", METHODS)
def test_arrays_through_a_pipe_arrive_in_the_slab_both_ways(method):
    use_torch = method == "fork"  # a spawn child importing torch costs seconds
    if use_torch:
        import torch
    a, b = tmp.Pipe()
    with Child(method, mp_children.echo_objects_until_none, b, use_torch) as child:
        for i in range(3):
            tensor = torch.arange(6.0) + i if use_torch else None
            a.send((np.arange(1000) + i, tensor))
            doubled, doubled_tensor, (array_in_slab, tensor_in_slab) = a.recv()
            assert np.array_equal(doubled, (np.arange(1000) + i) * 2)
            assert array_in_slab and mp_children.array_in_slab(doubled)
            if use_torch:
                assert tensor_in_slab and mp_children.tensor_in_slab(doubled_tensor)
                assert torch.equal(doubled_tensor, (torch.arange(6.0) + i) * 2)
            del doubled, doubled_tensor
        a.send(None)
        assert child.join() == 3


def test_a_pipe_end_travels_through_a_queue():
    a, b = tmp.Pipe()
    carrier = tmp.Queue()
    carrier.put(b)
    with Child("spawn", mp_children.send_on_connection_from_queue, carrier) as child:
        assert a.poll(WAIT)
        greeting, pid, values = a.recv()
        assert (greeting, pid) == ("hello from", child.pid)
        assert np.array_equal(values, np.arange(5))
        del values
    b.close()


def test_a_send_whose_frame_write_failed_does_not_shift_the_later_messages():
    """Once failed: `send` puts the message on the channel, then writes its frame; when the
    write raised (here a non-blocking descriptor with the pipe full; in use a signal
    handler raising while the writer waits on a full pipe), the message stayed without a
    frame, so the next frame took it: `recv` gave the message of the failed send instead
    of "next", and every later message arrived one send late. Now the failed send's frame
    is written before the next one: nothing is lost or shifted, and the failed send's
    message arrives (where the standard library's, never written, does not)."""
    reader, writer = tmp.Pipe(duplex=False)
    os.set_blocking(writer.fileno(), False)
    sent = 0
    with pytest.raises(BlockingIOError):
        while sent < 1_000_000:  # the pipe fills long before
            writer.send(sent)
            sent += 1
    os.set_blocking(writer.fileno(), True)
    assert [reader.recv() for _ in range(sent)] == list(range(sent))
    writer.send("next")
    assert reader.recv() == sent  # the send that raised: its message was already out
    assert reader.poll(WAIT) and reader.recv() == "next"
    assert not reader.poll(0)


@pytest.mark.parametrize("kind", ["Pipe", "SimpleQueue"])
def test_threads_sending_at_once_announce_each_message_exactly_once(kind):
    """Both write a message's frame after putting it on the channel. A counter of frames
    still to write, shared by the threads of a process, once raced: it went negative and
    a sender wrote frames until the pipe was full (a Pool's terminate hung, its task and
    main threads both putting on the result queue)."""
    import threading

    if kind == "Pipe":
        reader, writer = tmp.Pipe(duplex=False)
        send, recv, ready = writer.send, reader.recv, reader.poll
    else:
        queue = tmp.SimpleQueue()
        send, recv, ready = queue.put, queue.get, queue._reader.poll
    threads = [
        threading.Thread(target=lambda t=t: [send((t, i)) for i in range(500)]) for t in range(4)
    ]
    received = []
    for thread in threads:
        thread.start()
    while len(received) < 2000:
        assert ready(WAIT), f"{len(received)} of 2000 arrived"
        received.append(recv())
    for thread in threads:
        thread.join(WAIT)
    assert sorted(received) == sorted((t, i) for t in range(4) for i in range(500))
    assert not ready(0), "a frame with no message behind it"
