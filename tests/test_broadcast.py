"""`tensorslab.broadcast()` across real processes (fork and spawn): delivery to every
subscriber, flow control, dead subscribers, memory, read-only views, moving and sharing a
subscriber, closing."""

from __future__ import annotations

import multiprocessing as mp
import pickle
import threading

import pytest

import fanout_children as fc
import tensorslab
from fanout_helpers import CONTEXTS, Agent, Child, kill, occupancy, wait_until

TIMEOUT = 30


def expected(seqs) -> list:
    return [fc.digest(fc.message(seq)) for seq in seqs]


def start_readers(ctx_name, subs, **options) -> list[Child]:
    """A child per subscriber reading it until Closed; returns once each has used its own
    (so this process may close its handles: handing over is tested on its own)."""
    ctx = mp.get_context(ctx_name)
    readers = []
    for index, sub in enumerate(subs):
        started = ctx.Event()
        use_iter = options.get("use_iter", ()) == index
        reader = Child(ctx_name, fc.read_until_closed, sub, None, use_iter, started, timeout=90)
        readers.append(reader.start())
        assert started.wait(TIMEOUT), "a reader did not start"
    return readers


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_every_subscriber_gets_every_message_in_order_and_intact(ctx_name):
    # depth=3 with 60 messages: the publisher waits for the slowest of three readers often.
    pub, sub = tensorslab.broadcast(depth=3)
    subs = [sub, pub.subscribe(), sub.subscribe()]
    # The second reader iterates: its loop ends when the publisher has closed.
    readers = start_readers(ctx_name, subs, use_iter=1)
    for s in subs:
        s.close()
    sizes = [(seq % 5) * 20_000 for seq in range(60)]
    for seq in range(60):
        pub.put(fc.message(seq, sizes[seq]), timeout=TIMEOUT)
    pub.close()
    for reader in readers:
        assert reader.join() == [fc.digest(fc.message(seq, sizes[seq])) for seq in range(60)]
    # Every message was read by every subscriber and its views are gone: all freed (the
    # statistics of a closed handle still describe its channel).
    wait_until(lambda: occupancy(pub) == (0, 0), what="every block back in the slab")


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_late_subscriber_starts_at_the_next_message(ctx_name):
    pub, sub = tensorslab.broadcast(depth=16)
    for seq in range(4):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    late = pub.subscribe()
    pub.put(fc.message(4), timeout=TIMEOUT)
    later = sub.subscribe()
    for seq in range(5, 8):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    readers = start_readers(ctx_name, (sub, late, later))
    for handle in (sub, late, later):
        handle.close()
    pub.close()
    got = [reader.join() for reader in readers]
    assert got == [expected(range(8)), expected(range(4, 8)), expected(range(5, 8))]


def put_in_thread(pub, msg) -> tuple[threading.Event, list]:
    """Starts `pub.put(msg)` in a thread; returns (done, outcome)."""
    done, outcome = threading.Event(), []

    def put():
        try:
            pub.put(msg, timeout=TIMEOUT)
            outcome.append("put")
        except BaseException as error:
            outcome.append(repr(error))
        done.set()

    threading.Thread(target=put, daemon=True).start()
    return done, outcome


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_block_waits_for_the_slowest_subscriber_and_resumes_when_it_reads(ctx_name):
    pub, fast = tensorslab.broadcast(depth=3)
    slow = pub.subscribe()
    with Agent(ctx_name, slow) as agent:
        slow.close()
        for seq in range(3):
            pub.put(fc.message(seq), timeout=TIMEOUT)
            assert fast.get(timeout=TIMEOUT)["seq"] == seq
        # The fast subscriber has read everything; the slow one is `depth` behind.
        with pytest.raises(tensorslab.Full):
            pub.put(fc.message(3), timeout=0.2)
        with pytest.raises(tensorslab.Full):
            pub.put_nowait(fc.message(3))
        done, outcome = put_in_thread(pub, fc.message(3))
        # Nobody reads, so the put cannot finish: it is waiting (not a timing assertion).
        assert not done.wait(0.3), f"put returned while the slowest subscriber was full: {outcome}"
        assert agent.ask("read", 1) == [0]
        assert done.wait(TIMEOUT), "the publisher did not resume after the slow one read"
        assert outcome == ["put"]
        assert agent.ask("read", 3) == [1, 2, 3]
        assert fast.get(timeout=TIMEOUT)["seq"] == 3
        agent.stop()
    wait_until(lambda: occupancy(pub) == (0, 0), what="every block back in the slab")


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_drop_oldest_never_blocks_and_counts_exactly_what_was_missed(ctx_name):
    pub, reader = tensorslab.broadcast(depth=4, overflow="drop_oldest")
    stalled = pub.subscribe()
    with Agent(ctx_name, stalled) as agent:
        stalled.close()
        for seq in range(2):
            pub.put_nowait(fc.message(seq))
        assert [reader.get(timeout=TIMEOUT)["seq"] for _ in range(2)] == [0, 1]
        # 18 more with the stalled subscriber at 0 and this one at 2: put_nowait would
        # raise Full if the publisher waited for either.
        for seq in range(2, 20):
            pub.put_nowait(fc.message(seq))
        assert occupancy(pub)[0] == 4, "drop_oldest retains `depth` messages"
        assert [reader.get(timeout=TIMEOUT)["seq"] for _ in range(4)] == [16, 17, 18, 19]
        assert reader.missed == 20 - 2 - 4
        assert reader.stats()["missed"] == 14
        assert agent.ask("read", 4) == [16, 17, 18, 19]
        assert agent.ask("missed") == 16
        # Nothing read is skipped later: two more, both read, no new misses.
        pub.put_nowait(fc.message(20))
        pub.put_nowait(fc.message(21))
        assert agent.ask("read", 2) == [20, 21]
        assert agent.ask("missed") == 16
        agent.stop()
    assert [reader.get(timeout=TIMEOUT)["seq"] for _ in range(2)] == [20, 21]
    assert reader.missed == 14
    wait_until(lambda: occupancy(pub) == (0, 0), what="every block back in the slab")


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_killed_subscriber_is_dropped_and_its_memory_reclaimed(ctx_name):
    pub, sub = tensorslab.broadcast(depth=4)
    victim_sub = pub.subscribe()
    big = 1 << 20
    with Agent(ctx_name, victim_sub) as victim:
        victim_sub.close()
        for seq in range(4):
            pub.put(fc.message(seq, big), timeout=TIMEOUT)
            sub.get(timeout=TIMEOUT)
        # The victim holds views of 0 and 1 (retired, but held) and has not read 2..5.
        assert victim.ask("hold", 2) == [0, 1]
        for seq in (4, 5):
            pub.put(fc.message(seq, big), timeout=TIMEOUT)
        assert occupancy(pub)[0] == 6
        with pytest.raises(tensorslab.Full):
            pub.put(fc.message(6, big), timeout=0.2)
        done, outcome = put_in_thread(pub, fc.message(6, big))
        assert not done.wait(0.2), f"put returned while the victim was full: {outcome}"
        victim.kill()
        # The liveness check (~100 ms) notices the death; the bound here is generous.
        assert done.wait(TIMEOUT), "the publisher stayed blocked by a dead subscriber"
        assert outcome == ["put"]
    assert [sub.get(timeout=TIMEOUT)["seq"] for _ in range(3)] == [4, 5, 6]
    # Everything is read by the one live subscriber, and the dead one's holds are gone.
    wait_until(lambda: occupancy(pub) == (0, 0), what="the dead subscriber's memory")
    assert pub.stats()["receivers"] == 1


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_blocks_return_to_the_slab_only_when_read_by_all_and_released(ctx_name):
    pub, sub = tensorslab.broadcast(depth=8)
    other = pub.subscribe()
    with Agent(ctx_name, other) as agent:
        other.close()
        for seq in range(3):
            pub.put(fc.message(seq), timeout=TIMEOUT)
        held = [sub.get(timeout=TIMEOUT) for _ in range(3)]
        # Read here, not yet by the child's subscriber: retained for it.
        assert occupancy(pub)[0] == 3
        assert agent.ask("read", 3) == [0, 1, 2]
        # Read by every subscriber, but this process still holds views of all three.
        assert occupancy(pub)[0] == 3
        del held[0]
        assert occupancy(pub)[0] == 2
        held.clear()
        assert occupancy(pub) == (0, 0)
        agent.stop()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_numpy_arrives_read_only_and_copy_gives_private_writable_arrays(ctx_name):
    pub, sub = tensorslab.broadcast(depth=4)
    mine = pub.subscribe()
    for seq in range(2):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    assert Child(ctx_name, fc.check_read_only, sub, timeout=60).start().join() == []
    # The child zeroed its private copy of message 1; everyone else's is untouched.
    first, second = mine.get(timeout=TIMEOUT), mine.get(timeout=TIMEOUT)
    assert not first["a"].flags.writeable
    assert fc.digest(first) == fc.digest(fc.message(0))
    assert fc.digest(second) == fc.digest(fc.message(1))
    with pytest.raises(ValueError):
        second["b"][0, 0] = 1
    del first, second


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_torch_tensors_arrive_as_zero_copy_views(ctx_name):
    import torch

    pub, first = tensorslab.broadcast(depth=4)
    second = pub.subscribe()
    for seq in range(2):
        pub.put({"seq": seq, "t": torch.arange(1000.0) + seq}, timeout=TIMEOUT)
    got = Child(ctx_name, fc.torch_views, first, second, timeout=90).start().join()
    assert got == {
        "types": ["Tensor"] * 4,
        "same_view": True,
        "values": [True, True],
        "copy_is_private": True,
    }


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_subscriber_handed_to_a_child_keeps_its_position(ctx_name):
    """Handed as a `Process` argument (pickled for spawn, inherited for fork), and let go
    of in the parent before the child first uses it: the child reads where the parent
    stopped."""
    ctx = mp.get_context(ctx_name)
    pub, sub = tensorslab.broadcast(depth=8)
    for seq in range(6):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    assert [sub.get(timeout=TIMEOUT)["seq"] for _ in range(3)] == [0, 1, 2]
    go = ctx.Event()
    child = Child(ctx_name, fc.read_until_closed, sub, go, timeout=60).start()
    sub.close()
    for seq in range(6, 8):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    go.set()
    pub.close()
    assert child.join() == expected(range(3, 8))


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_publisher_handed_to_a_child_keeps_the_channel_open(ctx_name):
    """The parent closes its publisher right after handing one to a child that has not
    published yet: subscribers wait for the child's messages instead of seeing Closed."""
    ctx = mp.get_context(ctx_name)
    pub, sub = tensorslab.broadcast(depth=8)
    go = ctx.Event()
    child = Child(ctx_name, fc.publish_then_close, pub, 0, 3, go, timeout=60).start()
    pub.close()
    go.set()
    got = []
    try:
        for _ in range(3):
            got.append(sub.get(timeout=TIMEOUT)["seq"])
    finally:
        child.join()
    assert got == [0, 1, 2]
    with pytest.raises(tensorslab.Closed):
        sub.get(timeout=TIMEOUT)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_two_processes_using_one_subscriber_split_its_messages(ctx_name):
    ctx = mp.get_context(ctx_name)
    pub, sub = tensorslab.broadcast(depth=4)
    go = ctx.Event()
    readers = [Child(ctx_name, fc.read_until_closed, sub, go, timeout=90).start() for _ in "ab"]
    go.set()
    for seq in range(80):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    pub.close()
    got = [reader.join() for reader in readers]
    sub.close()
    seqs = [[d[0] for d in g] for g in got]
    assert sorted(seqs[0] + seqs[1]) == list(range(80)), "each message to exactly one reader"
    for digests in got:
        assert digests == expected(d[0] for d in digests), "out of order or corrupt"


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_get_after_every_publisher_closed_and_all_read_raises_closed(ctx_name):
    pub, sub = tensorslab.broadcast(depth=8)
    second_pub = pub  # a second publisher handle, in a child
    child = Child(ctx_name, fc.publish_then_close, second_pub, 0, 3, timeout=60).start()
    child.join()
    pub.put(fc.message(3), timeout=TIMEOUT)
    pub.close()
    assert [msg["seq"] for msg in sub] == [0, 1, 2, 3]
    with pytest.raises(tensorslab.Closed, match="every publisher of this channel"):
        sub.get(timeout=TIMEOUT)
    with pytest.raises(tensorslab.Closed):
        sub.get_nowait()


@pytest.mark.parametrize("ctx_name", CONTEXTS)
@pytest.mark.parametrize("how", ["close", "SIGKILL"])
def test_put_after_every_subscriber_left_raises_closed(ctx_name, how):
    ctx = mp.get_context(ctx_name)
    pub, sub = tensorslab.broadcast(depth=8)
    other = pub.subscribe()
    started = ctx.Event()
    target = (fc.close_handle, other) if how == "close" else (fc.wait_forever, other, started)
    child = Child(ctx_name, *target, timeout=60).start()
    other.close()
    pub.put(fc.message(0), timeout=TIMEOUT)
    sub.close()
    if how == "close":
        child.join()
    else:
        assert started.wait(TIMEOUT)
        kill(child)
        # As for a channel: the dead process is reaped by the liveness check (a peer that
        # notices), after which a put knows every subscriber is gone.
        wait_until(lambda: child.pid not in pub.stats()["processes"], what="the reap")
    expected_error = tensorslab.Closed if how == "close" else tensorslab.PeerGone
    with pytest.raises(expected_error):
        pub.put(fc.message(1), timeout=TIMEOUT)


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_subscriber_closed_before_the_child_loads_its_pickle(ctx_name):
    """What happens: the pickle is a ticket that keeps the subscriber alive (and the
    messages published meanwhile retained for it) until a process loads it; the child
    that loads it then reads from where the parent left off, though the parent closed
    and dropped its own handle first."""
    ctx = mp.get_context(ctx_name)
    pub, sub = tensorslab.broadcast(depth=8)
    pub.put(fc.message(0), timeout=TIMEOUT)
    assert sub.get(timeout=TIMEOUT)["seq"] == 0
    data = pickle.dumps(sub)
    sub.close()
    del sub
    for seq in range(1, 4):
        pub.put(fc.message(seq), timeout=TIMEOUT)
    assert occupancy(pub)[0] == 3, "messages are retained for the pickled subscriber"
    go = ctx.Event()
    child = Child(ctx_name, fc.load_pickled_subscriber, data, go, timeout=60).start()
    go.set()
    pub.put(fc.message(4), timeout=TIMEOUT)
    pub.close()
    assert child.join() == expected(range(1, 5))


def test_bad_arguments_raise_value_error_naming_them():
    for depth in (0, -1):
        with pytest.raises(ValueError, match=rf"depth.*{depth}"):
            tensorslab.broadcast(depth=depth)
    with pytest.raises(ValueError, match=r"overflow.*bogus"):
        tensorslab.broadcast(overflow="bogus")


def test_a_blocked_subscriber_uses_almost_no_cpu():
    pub, sub = tensorslab.broadcast(depth=4)
    got = Child("spawn", fc.cpu_while_blocked, sub, 3.0, timeout=60).start().join()
    assert got["outcome"] == "Empty"
    # CPU per second of wall time blocked, not a duration: < 5 % of a core.
    assert got["cpu"] < 0.05 * got["wall"], got
    pub.close()
