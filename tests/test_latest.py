"""`tensorslab.latest()` across real processes (fork and spawn): complete versions under a
writer publishing flat out, bounded memory, killed readers, versions, `load_into` into
modules and dicts (and its checks), closing."""

from __future__ import annotations

import multiprocessing as mp
import queue
import subprocess
import sys

import pytest
import torch

import fanout_children as fc
import tensorslab
from fanout_helpers import CONTEXTS, Child, kill, occupancy, wait_until

TIMEOUT = 30


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_readers_see_only_whole_versions_while_the_writer_publishes_flat_out(ctx_name):
    ctx = mp.get_context(ctx_name)
    writer, reader = tensorslab.latest()
    assert writer.publish(fc.weights(1)) == 1
    in_flight, one_version = occupancy(writer)
    assert in_flight == 1
    # The writer goes on until each reader has read `count` versions (each a new one).
    count, most = 40, 200_000
    readers, enough = [], []
    for how in ("get", "load_into"):
        started = ctx.Event()
        enough.append(ctx.Event())
        child = Child(ctx_name, fc.read_versions, reader, how, started, enough[-1], count)
        readers.append(child.start())
        assert started.wait(TIMEOUT), f"the {how} reader did not start"
    started = ctx.Event()
    publisher = Child(ctx_name, fc.publish_until, writer, 2, enough, most, started, timeout=120)
    publisher.start()
    assert started.wait(TIMEOUT), "the writer did not start"
    writer.close()
    reader.close()
    last = publisher.join()
    assert last < most, "the readers never read enough versions"
    for how, child in zip(("get", "load_into"), readers):
        got = child.join()
        assert got["problems"] == [], f"{how} reader: {got['problems'][:5]}"
        assert len(got["seen"]) >= count
        assert got["seen"][-1] == last, f"{how} reader never saw the last version"
        # At most: the newest, the one being published, one held by each reader, and one
        # retired while still held: five versions' worth.
        assert got["most_used"] <= 5 * one_version, (how, got["most_used"], one_version)
    # Nobody holds anything: the newest version alone is left.
    wait_until(lambda: occupancy(writer) == (1, one_version), what="only the newest version")


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_killed_reader_holding_a_version_frees_it(ctx_name):
    ctx = mp.get_context(ctx_name)
    writer, reader = tensorslab.latest()
    writer.publish(fc.weights(1))
    one_version = occupancy(writer)[1]
    ready = ctx.Queue()
    holder = Child(ctx_name, fc.hold_newest, reader, ready, timeout=90).start()
    try:
        assert ready.get(timeout=TIMEOUT) == 1
        writer.publish(fc.weights(2))
        writer.publish(fc.weights(3))
        # Version 1 (held by the child) and version 3 (the newest); version 2 was freed.
        assert occupancy(writer) == (2, 2 * one_version)
        kill(holder)
    finally:
        holder.kill()
    wait_until(lambda: occupancy(writer) == (1, one_version), what="the dead reader's version")
    version, value = reader.get(timeout=TIMEOUT)
    assert version == 3 and fc.torn(value, 3) == []


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_version_is_zero_before_any_publish_then_the_last_published(ctx_name):
    ctx = mp.get_context(ctx_name)
    commands, replies = ctx.Queue(), ctx.Queue()
    writer, reader = tensorslab.latest()
    assert reader.version == writer.version == reader.stats()["version"] == 0
    with Child(ctx_name, fc.versions_seen, reader, commands, replies, timeout=60):
        assert replies.get(timeout=TIMEOUT) == "started"
        commands.put("version")
        assert replies.get(timeout=TIMEOUT) == 0
        assert [writer.publish({"n": n}) for n in range(3)] == [1, 2, 3]
        commands.put("version")
        assert replies.get(timeout=TIMEOUT) == 3
        commands.put("stop")
    assert reader.version == writer.version == writer.stats()["version"] == 3


def test_get_newer_than_the_newest_raises_empty_after_the_timeout():
    writer, reader = tensorslab.latest()
    with pytest.raises(tensorslab.Empty):
        reader.get(timeout=0.2)
    version = writer.publish(fc.weights(1))
    assert reader.get(newer_than=0, timeout=0.2)[0] == version
    with pytest.raises(tensorslab.Empty) as raised:
        reader.get(newer_than=version, timeout=0.2)
    assert isinstance(raised.value, queue.Empty)
    target = fc.zero_weights()
    with pytest.raises(tensorslab.Empty):
        reader.load_into(target, newer_than=version, timeout=0.2)
    assert fc.torn(target, 0) == [], "a load that timed out changed the target"


def trained_module():
    """A module whose parameters and buffers (BatchNorm statistics) all differ from a
    fresh one's."""
    module = fc.make_module(seed=1)
    module.train()
    with torch.no_grad():
        module(torch.randn(32, 8))
    return module


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_load_into_a_module_and_a_dict(ctx_name):
    writer, reader = tensorslab.latest()
    source = trained_module().state_dict()
    assert "1.running_mean" in source and source["1.num_batches_tracked"].item() == 1
    writer.publish(source)
    got = Child(ctx_name, fc.load_into_module_and_dict, reader, timeout=90).start().join()
    assert got["versions"] == (1, 1)
    assert got["in_place"], "load_into replaced the module's tensors instead of copying into them"
    for into in ("module", "dict"):
        assert got[into].keys() == source.keys()
        for name, tensor in source.items():
            assert torch.equal(got[into][name], tensor), f"{into}[{name!r}] differs"


def mismatched_states():
    """(published state, exception, words the message must name): each wrong in its last
    tensor only, so a load that copied before checking would change the target."""
    good = trained_module().state_dict()
    last = list(good)[-1]
    cases = []
    missing = dict(good)
    del missing[last]
    cases.append((missing, ValueError, ["missing", last]))
    cases.append(({**good, "extra.weight": torch.zeros(2)}, ValueError, ["extra.weight"]))
    shape = {**good, last: torch.zeros(good[last].numel() + 1)}
    cases.append((shape, ValueError, [last, "shape"]))
    dtype = {**good, last: good[last].double()}
    cases.append((dtype, ValueError, [last, "float64", "float32"]))
    cases.append(([good[last]], TypeError, ["list", "state dict"]))
    return cases


def test_load_into_mismatches_raise_clear_errors_and_leave_the_target_unchanged():
    writer, reader = tensorslab.latest()
    target = fc.make_module(seed=2)
    before = {name: t.detach().clone() for name, t in target.state_dict().items()}
    version = 0
    for state, error, words in mismatched_states():
        version = writer.publish(state)
        with pytest.raises(error) as raised:
            reader.load_into(target, newer_than=version - 1, timeout=TIMEOUT)
        for word in words:
            assert word in str(raised.value), (word, str(raised.value))
        for name, tensor in target.state_dict().items():
            assert torch.equal(tensor, before[name]), f"{name} changed by a failed load"
    writer.publish(trained_module().state_dict())
    with pytest.raises(TypeError, match="int"):
        reader.load_into(42, timeout=TIMEOUT)
    with pytest.raises(TypeError, match="0.weight"):
        reader.load_into({**target.state_dict(), "0.weight": [1.0]}, timeout=TIMEOUT)
    assert reader.load_into(target, timeout=TIMEOUT) == version + 1


@pytest.mark.parametrize("ctx_name", CONTEXTS)
@pytest.mark.parametrize("how", ["close", "SIGKILL"])
def test_get_newer_than_the_last_raises_closed_once_the_writer_is_gone(ctx_name, how):
    ctx = mp.get_context(ctx_name)
    writer, reader = tensorslab.latest()
    started = ctx.Event()
    if how == "close":
        child = Child(ctx_name, fc.publish_versions, writer, 1, 3, started, timeout=60)
    else:
        child = Child(ctx_name, fc.publish_then_wait, writer, 3, started, timeout=60)
    child.start()
    try:
        assert started.wait(TIMEOUT)
        writer.close()
        if how == "close":
            child.join()
        else:
            assert reader.version == 3
            kill(child)
            wait_until(lambda: child.pid not in reader.stats()["processes"], what="the reap")
    finally:
        child.kill()
    expected = tensorslab.Closed if how == "close" else tensorslab.PeerGone
    with pytest.raises(expected, match="every writer of this channel"):
        reader.get(newer_than=3, timeout=TIMEOUT)
    with pytest.raises(expected):
        reader.load_into(fc.zero_weights(), newer_than=3, timeout=TIMEOUT)
    # The newest version stays readable.
    version, value = reader.get(timeout=TIMEOUT)
    assert version == 3 and fc.torn(value, 3) == []


@pytest.mark.parametrize("ctx_name", CONTEXTS)
def test_a_writer_handed_to_a_child_keeps_the_mailbox_open(ctx_name):
    """The parent closes its writer right after handing one to a child that has not
    published yet: readers wait for the child's versions instead of seeing Closed."""
    ctx = mp.get_context(ctx_name)
    writer, reader = tensorslab.latest()
    go = ctx.Event()
    child = Child(ctx_name, fc.publish_versions, writer, 1, 2, None, go, timeout=60).start()
    writer.close()
    go.set()
    try:
        version, value = reader.get(newer_than=0, timeout=TIMEOUT)
        assert fc.torn(value, version) == []
        del value
    finally:
        child.join()
    assert reader.get(newer_than=1, timeout=TIMEOUT)[0] == 2


def test_load_into_from_numpy_arrays_warns_nothing():
    """A state published as NumPy arrays arrives read-only; loading it must not set off
    torch's "not writable" warning (checked in a fresh interpreter: torch warns once per
    process)."""
    script = (
        "import numpy as np, torch, tensorslab\n"
        "w, r = tensorslab.latest()\n"
        "w.publish({'a': np.arange(4, dtype=np.float32)})\n"
        "target = {'a': torch.zeros(4)}\n"
        "assert r.load_into(target) == 1\n"
        "assert target['a'].tolist() == [0.0, 1.0, 2.0, 3.0]\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
