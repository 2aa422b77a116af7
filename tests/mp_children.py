"""Functions that tests/test_multiprocessing.py runs in child processes.

Importable by name, so `spawn` children find them; none imports torch (a spawn child that
needs it imports it itself). Every blocking call is bounded.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import numpy as np

WAIT = 60

# A slab segment of a channel (not its control block), as /proc/self/maps names it.
_SLAB_SEGMENT = re.compile(r"tensorslab-[0-9a-f]+-\d+")


def in_slab(address: int) -> bool:
    """True when ``address`` lies in a tensorslab slab segment mapped by this process."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            if _SLAB_SEGMENT.search(line):
                start, end = (int(bound, 16) for bound in line.split()[0].split("-"))
                if start <= address < end:
                    return True
    return False


def array_in_slab(array: np.ndarray) -> bool:
    return in_slab(array.__array_interface__["data"][0])


def tensor_in_slab(tensor) -> bool:
    return in_slab(tensor.data_ptr())


# --- queues (CPython's _TestQueue, _TestSimpleQueue behaviours) ----------------------------


def get_six_when_told(queue, child_can_start, parent_can_continue):
    assert child_can_start.wait(WAIT)
    taken = [queue.get(timeout=WAIT) for _ in range(6)]
    parent_can_continue.set()
    return taken


def put_four_when_told(queue, child_can_start, parent_can_continue):
    assert child_can_start.wait(WAIT)
    for value in (2, 3, 4, 5):
        queue.put(value)
    parent_can_continue.set()


def put_ten_to_twenty(queue):
    for value in range(10, 20):
        queue.put(value)


def put_emptiness_twice(queue, child_can_start, parent_can_continue):
    assert child_can_start.wait(WAIT)
    try:
        queue.put(queue.empty())
        queue.put(queue.empty())
    finally:
        parent_can_continue.set()


def put_then_exit(queue, values):
    for value in values:
        queue.put(value)


def work_until_none(tasks, results):
    """A JoinableQueue consumer: doubles each array, reports whether it arrived in the slab,
    and marks each task done after its result is out."""
    handled = 0
    while True:
        item = tasks.get(timeout=WAIT)
        if item is None:
            tasks.task_done()
            return handled
        index, array = item
        results.put((index, array * 2, array_in_slab(array), os.getpid()))
        del array, item
        tasks.task_done()
        handled += 1


def join_queue(queue):
    return queue.join(timeout=WAIT)


# --- pipes (CPython's _TestConnection, _TestPoll, TestWait behaviours) ---------------------


def echo_bytes_until_empty(conn):
    """Echo every byte string until b'' (as CPython's _echo)."""
    for message in iter(lambda: conn.recv_bytes(), b""):
        conn.send_bytes(message)
    conn.close()


def echo_objects_until_none(conn, use_torch):
    """Echo objects until None, doubling arrays (and tensors), with where each arrived."""
    if use_torch:
        import torch
    count = 0
    while conn.poll(WAIT):
        message = conn.recv()
        if message is None:
            break
        array, tensor = message
        report = (array_in_slab(array), use_torch and tensor_in_slab(tensor))
        conn.send((array * 2, tensor * 2 if use_torch else None, report))
        count += 1
    if use_torch:
        assert isinstance(tensor, torch.Tensor)
    conn.close()
    return count


def send_ten_then_close(conn):
    for i in range(10):
        conn.send((i, os.getpid(), np.full(100, i)))
    conn.close()


def send_then_die(conn, count):
    for i in range(count):
        conn.send({"i": i, "a": np.arange(i + 1)})
    os.kill(os.getpid(), signal.SIGKILL)


def send_strings(conn, strings):
    for data in strings:
        conn.send_bytes(data)
    conn.close()


def send_on_connection_from_queue(queue):
    conn = queue.get(timeout=WAIT)
    conn.send(("hello from", os.getpid(), np.arange(5)))
    conn.close()


# --- spawn ---------------------------------------------------------------------------------


def fail_one_wait_others(index, failing, marker_directory):
    """Process ``failing`` raises; the others wait (to be terminated)."""
    if index == failing:
        raise ValueError(f"boom in process {index}")
    open(os.path.join(marker_directory, f"started-{index}"), "w").close()
    time.sleep(WAIT)


def die_by_signal(index, victim):
    if index == victim:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(WAIT)


def exit_with_traceback(index):
    raise RuntimeError(f"failing in process {index}")


def exit_with(index, code):
    sys.exit(code)


def put_index_and_array(index, queue):
    import multiprocessing

    queue.put((index, np.full(3, index), multiprocessing.get_start_method()))


# --- pool ----------------------------------------------------------------------------------


def square(x):
    return x * x


def multiply(x, y):
    return x * y


def where_it_arrived(array):
    return array_in_slab(array), array + 1


def tensor_where_it_arrived(tensor):
    return tensor_in_slab(tensor), tensor + 1


def pid_of_worker(_):
    return os.getpid()


def raise_value_error(x):
    raise ValueError(f"bad value {x}")


def sleep_long(_):
    time.sleep(WAIT)


def send_on_stdlib_connection_from_queue(queue):
    conn = queue.get(timeout=WAIT)
    conn.send("hello")
    conn.close()


class Holder:
    """An object the channel can only pickle, holding ``value``."""

    def __init__(self, value):
        self.value = value


class Registered:
    """Pickled by a reducer registered with ForkingPickler (see the test that uses it)."""

    def __init__(self, value):
        self.value = value


def rebuild_registered(value):
    return Registered(("rebuilt by the registered reducer", value))
