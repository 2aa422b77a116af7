"""asyncio on every handle (`put_async`, `get_async`, `async for`) across real processes
(fork and spawn): exactly-once delivery to many concurrent awaiting consumers beside a
synchronous one in another process, waiting for room, cancellation mid-wait, timeouts,
closing, broadcast and latest, Ctrl-C, and one helper thread per process."""

from __future__ import annotations

import asyncio
import gc
import multiprocessing as mp
import os
import queue
import random
import signal
import threading

import pytest

import aio_children as ac
import helpers
import tensorslab

CONTEXTS = ("fork", "spawn")
TIMEOUT = 30


class Child(helpers.Child):
    """`helpers.Child` started through `aio_children.run_and_report`: a spawn child then
    imports NumPy and tensorslab only."""

    def __init__(self, ctx_name, target, *args, timeout: float = 60):
        super().__init__(ctx_name, target, *args, timeout=timeout)
        self.process = mp.get_context(ctx_name).Process(
            target=ac.run_and_report,
            args=(self._result_path, target, args),
            name=self.process.name,
            daemon=True,
        )


def run(coroutine):
    """`asyncio.run`, bounded: a wait that never ends fails the test instead of hanging."""

    async def bounded():
        return await asyncio.wait_for(coroutine, TIMEOUT * 2)

    return asyncio.run(bounded())


def run_in_child(ctx_name, target, *args):
    return Child(ctx_name, target, *args).start().join()


def helper_threads() -> int:
    return ac.helper_threads()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_many_awaiting_consumers_and_a_remote_one_get_each_message_once(ctx_name):
    # 600 messages through a ring of 4 from a producer child; 8 tasks of this loop and a
    # synchronous consumer child take them. Half of the tasks wait through `wait_for` with
    # short timeouts, so waits are cancelled in the middle all the time: a cancelled wait
    # must neither lose its message nor take one.
    count = 600
    tx, rx = tensorslab.channel(4)
    ctx = mp.get_context(ctx_name)
    started = [ctx.Event(), ctx.Event()]
    with Child(ctx_name, ac.consume_until_closed, rx, started[0], timeout=120) as consumer:
        assert started[0].wait(TIMEOUT)
        with Child(ctx_name, ac.produce, tx, count, started[1], timeout=120) as producer:
            assert started[1].wait(TIMEOUT)
            tx.close()

            async def consume(index):
                rng = random.Random(index)
                seqs = []
                while True:
                    try:
                        if index % 2:
                            msg = await asyncio.wait_for(rx.get_async(), rng.uniform(0, 0.005))
                        else:
                            msg = await rx.get_async(timeout=TIMEOUT)
                    except asyncio.TimeoutError:
                        continue
                    except tensorslab.Closed:
                        return seqs
                    seqs.append(ac.check(msg))
                    del msg

            async def main():
                return await asyncio.gather(*(consume(index) for index in range(8)))

            mine = run(main())
            assert producer.join() == count
        theirs = consumer.join()
    taken = [seq for seqs in mine for seq in seqs] + theirs
    assert sorted(taken) == list(range(count)), "a message was lost or delivered twice"
    rx.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_put_async_waits_for_a_remote_consumer_and_the_loop_keeps_running(ctx_name):
    # The consumer drains only once a ticker task of this loop has ticked while the put
    # waits: a put that blocked the loop would never let it tick, and the test would hang
    # (bounded by `run`) instead of passing.
    tx, rx = tensorslab.channel(2)
    go = mp.get_context(ctx_name).Event()
    with Child(ctx_name, ac.drain_after, rx, go, 12) as consumer:
        rx.close()
        tx.put_nowait(ac.message(0))
        tx.put_nowait(ac.message(1))
        with pytest.raises(tensorslab.Full):
            tx.put_nowait(ac.message(2))

        async def main():
            ticks = 0
            puts = (tx.put_async(ac.message(seq), timeout=TIMEOUT) for seq in range(2, 12))
            putting = asyncio.ensure_future(asyncio.gather(*puts))
            while ticks < 20:
                await asyncio.sleep(0.001)
                ticks += 1
                assert not putting.done(), "a put finished on a full ring nobody drained"
            go.set()
            await putting
            return ticks

        assert run(main()) == 20
        assert sorted(consumer.join()) == list(range(12))
    tx.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_cancelled_get_leaves_the_message_for_the_next_get(ctx_name):
    tx, rx = tensorslab.channel(4)
    ctx = mp.get_context(ctx_name)

    async def main():
        waiting = asyncio.ensure_future(rx.get_async())
        for _ in range(3):
            await asyncio.sleep(0)  # the get tried, armed its wait and awaits
        assert not waiting.done()
        # A remote put, seen by the helper, and the cancel before this loop runs again:
        # the wait is cancelled with the message already there.
        run_in_child(ctx_name, ac.produce, tx, 1, ctx.Event())
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert rx.qsize() == 1, "the cancelled get took the message"
        return await rx.get_async(timeout=TIMEOUT)

    assert ac.check(run(main())) == 0
    tx.close()
    with pytest.raises(tensorslab.Closed):  # exactly one message was there
        rx.get_nowait()
    rx.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_cancelled_put_publishes_nothing(ctx_name):
    # A put waiting on a full ring is cancelled; a remote consumer then drains the channel
    # and must find only the messages whose puts returned.
    tx, rx = tensorslab.channel(2)
    go = mp.get_context(ctx_name).Event()
    with Child(ctx_name, ac.drain_after, rx, go, 3) as consumer:
        rx.close()

        async def main():
            await tx.put_async(ac.message(0))
            await tx.put_async(ac.message(1))
            waiting = asyncio.ensure_future(tx.put_async(ac.message(99)))
            for _ in range(3):
                await asyncio.sleep(0)
            assert not waiting.done()
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            assert tx.qsize() == 2
            go.set()
            await tx.put_async(ac.message(2), timeout=TIMEOUT)

        run(main())
        assert consumer.join() == [0, 1, 2]
    tx.close()


def test_timeouts_raise_empty_and_full_as_the_blocking_calls_do():
    tx, rx = tensorslab.channel(1)
    queue_ = tensorslab.Queue(1)

    async def main():
        with pytest.raises(tensorslab.Empty, match="before the timeout"):
            await rx.get_async(timeout=0.02)
        with pytest.raises(queue.Empty):  # the standard library's class too
            await rx.get_async(timeout=0)
        await tx.put_async("a", timeout=0)
        with pytest.raises(tensorslab.Full, match="capacity 1"):
            await tx.put_async("b", timeout=0.02)
        with pytest.raises(ValueError, match="non-negative"):
            await rx.get_async(timeout=-1)
        assert await rx.get_async(timeout=0) == "a"
        # The queue takes a negative timeout as one already past, as mp.Queue does.
        with pytest.raises(queue.Empty):
            await queue_.get_async(timeout=-1)
        await queue_.put_async("q")
        with pytest.raises(queue.Full):
            await queue_.put_async("r", timeout=0.01)
        assert await queue_.get_async() == "q"

    run(main())
    queue_.close()
    with pytest.raises(ValueError, match="is closed"):
        run(queue_.get_async())
    for handle in (tx, rx):
        handle.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_async_for_ends_when_every_sender_closed(ctx_name):
    tx, rx = tensorslab.channel(2)
    queue_ = tensorslab.Queue(2)
    ctx = mp.get_context(ctx_name)
    with Child(ctx_name, ac.produce, tx, 30, ctx.Event()):
        tx.close()

        async def main():
            return [ac.check(msg) async for msg in rx]

        assert run(main()) == list(range(30))
    rx.close()

    async def through_queue():
        async def producer():
            for seq in range(10):
                await queue_.put_async(seq)
            queue_._tx.close()  # this process's only sender: the queue runs dry

        async def consumer():
            return [seq async for seq in queue_]

        got, _ = await asyncio.gather(consumer(), producer())
        return got

    assert run(through_queue()) == list(range(10))
    queue_.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_killed_producer_ends_the_wait_with_peer_gone(ctx_name):
    # The only sender left is held by a child that is SIGKILLed while we await: the
    # reaper's close wakes the wait, which raises PeerGone (not a quiet end of the stream).
    tx, rx = tensorslab.channel(2)
    started = mp.get_context(ctx_name).Event()
    holder = Child(ctx_name, ac.hold, tx, started).start()
    assert started.wait(TIMEOUT)
    tx.close()

    async def main():
        waiting = asyncio.ensure_future(rx.get_async(timeout=TIMEOUT))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not waiting.done()
        os.kill(holder.pid, signal.SIGKILL)
        with pytest.raises(tensorslab.PeerGone):
            await waiting

    run(main())
    holder.process.join(TIMEOUT)
    holder.join(expect_exitcode=None)
    rx.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_broadcast_subscribers_await_and_publishers_wait_for_the_slowest(ctx_name):
    pub, sub = tensorslab.broadcast(depth=2)
    remote = pub.subscribe()
    started = mp.get_context(ctx_name).Event()
    with Child(ctx_name, ac.read_subscriber, remote, started) as reader:
        assert started.wait(TIMEOUT)
        remote.close()

        async def main():
            async def publish():
                for seq in range(40):
                    await pub.put_async(ac.message(seq), timeout=TIMEOUT)
                pub.close()

            async def read():
                return [ac.check(msg) async for msg in sub]

            got, _ = await asyncio.gather(read(), publish())
            return got

        assert run(main()) == list(range(40))
        assert reader.join() == list(range(40))
    sub.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_latest_readers_await_newer_versions(ctx_name):
    writer, reader = tensorslab.latest()
    go = mp.get_context(ctx_name).Event()
    with Child(ctx_name, ac.write_versions, writer, 5, go):
        writer.close()

        async def main():
            with pytest.raises(tensorslab.Empty):
                await reader.get_async(timeout=0.01)
            go.set()
            version, value = await reader.get_async(newer_than=0, timeout=TIMEOUT)
            assert (version, value) == (1, {"version": 1})
            seen = []
            async for version, value in reader:
                assert value == {"version": version}
                seen.append(version)
                go.set()
            return seen

        seen = run(main())
    assert seen == sorted(set(seen)) and seen[-1] == 5, seen
    reader.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_ctrl_c_while_awaiting_leaves_the_channel_usable(ctx_name):
    tx, rx = tensorslab.channel(4)
    ctx = mp.get_context(ctx_name)
    awaiting, interrupted = ctx.Event(), ctx.Event()
    with Child(ctx_name, ac.interrupted_while_awaiting, rx, awaiting, interrupted) as child:
        assert awaiting.wait(TIMEOUT), "the child never awaited"
        os.kill(child.pid, signal.SIGINT)
        assert interrupted.wait(TIMEOUT), "the child did not come back from Ctrl-C"
        # Nothing was taken by the interrupted wait; the next messages reach the child's
        # plain get and this process.
        tx.put(ac.message(7), timeout=TIMEOUT)
        tx.put(ac.message(8), timeout=TIMEOUT)
        outcome, after = child.join()
    assert outcome == ("KeyboardInterrupt", None)
    assert after == 7
    assert ac.check(rx.get(timeout=TIMEOUT)) == 8
    tx.close()
    rx.close()


def test_one_helper_thread_serves_every_handle_and_loop():
    channels = [tensorslab.channel(1) for _ in range(4)]
    pub, sub = tensorslab.broadcast(depth=1)
    counts = []

    async def wait_on_all():
        waits = [asyncio.ensure_future(rx.get_async(timeout=TIMEOUT)) for _, rx in channels]
        waits.append(asyncio.ensure_future(sub.get_async(timeout=TIMEOUT)))
        for _ in range(3):
            await asyncio.sleep(0)
        counts.append(helper_threads())
        return await asyncio.gather(*waits)

    def in_thread(results):
        results.append(asyncio.run(wait_on_all()))

    results: list = []
    # Two loops in two threads, and this thread's, all waiting at once.
    threads = [threading.Thread(target=in_thread, args=(results,)) for _ in range(2)]

    async def main():
        for thread in threads:
            thread.start()
        waits = asyncio.ensure_future(wait_on_all())
        for _ in range(3):
            await asyncio.sleep(0)
        while len(counts) < 3:
            await asyncio.sleep(0.01)
        for index, (tx, _) in enumerate(channels):
            for _ in range(3):
                await tx.put_async(index, timeout=TIMEOUT)
        for _ in range(3):
            await pub.put_async("all", timeout=TIMEOUT)
        return await waits

    results.append(run(main()))
    for thread in threads:
        thread.join(TIMEOUT)
    assert counts == [1, 1, 1]
    assert helper_threads() == 1
    assert len(results) == 3
    assert sorted(value for result in results for value in result[:4]) == sorted(
        [0, 1, 2, 3] * 3
    )
    for tx, rx in channels:
        tx.close()
        rx.close()
    pub.close()
    sub.close()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_child_process_starts_its_own_helper(ctx_name):
    # This process has a helper already (earlier tests, or this wait): a fork child
    # inherits none, and starts its own on first use.
    tx, rx = tensorslab.channel(1)

    async def main():
        await tx.put_async("here")
        return await rx.get_async(timeout=TIMEOUT)

    assert run(main()) == "here"
    # A wait armed in another thread's loop while the child is forked: the child drops the
    # parent's waits and serves its own; the parent's wait still ends with its message.
    other_tx, other_rx = tensorslab.channel(1)
    armed = threading.Event()
    results: list = []

    async def wait_elsewhere():
        waiting = asyncio.ensure_future(other_rx.get_async(timeout=TIMEOUT))
        asyncio.get_running_loop().call_soon(armed.set)
        return await waiting

    thread = threading.Thread(target=lambda: results.append(asyncio.run(wait_elsewhere())))
    thread.start()
    assert armed.wait(TIMEOUT)
    got, helpers_there = run_in_child(ctx_name, ac.async_round_trip, tx, rx, 40, {})
    assert got == list(range(40))
    assert helpers_there == 1
    other_tx.put("still waited for")
    thread.join(TIMEOUT)
    assert results == ["still waited for"]
    for handle in (tx, rx, other_tx, other_rx):
        handle.close()


def test_without_futex_waitv_the_one_word_fallback_delivers():
    tx, rx = tensorslab.channel(2)
    env = {"TENSORSLAB_NO_FUTEX_WAITV": "1"}
    got, _ = run_in_child("spawn", ac.async_round_trip, tx, rx, 40, env)
    assert got == list(range(40))
    tx.close()
    rx.close()


def eventfds() -> int:
    found = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            found += os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
        except OSError:
            continue  # the listdir's own descriptor, closed since
    return found


def test_a_loop_closed_with_a_wait_pending_leaves_no_eventfd_and_no_wait():
    # Closed without cancelling its tasks (run_until_complete, then close): once the loop
    # and its tasks are garbage, the loop's eventfd is closed and the wait disarmed.
    tx, rx = tensorslab.channel(1)
    before = eventfds()
    for _ in range(5):
        loop = asyncio.new_event_loop()
        task = loop.create_task(rx.get_async())
        loop.run_until_complete(asyncio.sleep(0.01))
        assert not task.done()
        loop.close()
        del loop, task
    gc.collect()
    assert eventfds() == before, "each closed loop left its eventfd open"
    tx.put("not taken by a closed loop")
    assert rx.get(timeout=TIMEOUT) == "not taken by a closed loop"
    tx.close()
    rx.close()


def test_a_queue_that_put_async_then_closed_answers_empty_as_after_put():
    # As multiprocessing.Queue (and tensorslab.Queue after put): once this process has
    # put, empty() after close() raises OSError; put_async is a put.
    q = tensorslab.Queue()
    run(q.put_async("x"))
    q.close()
    with pytest.raises(OSError, match="closed"):
        q.empty()
