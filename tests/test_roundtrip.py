"""Every header type round-trips exactly: same type, same value, same nesting.

In process through `dumps`/`loads` and a channel, and through channels to spawn and fork
children and back (the child compares against its own copy of each sample).
"""

from __future__ import annotations

import pytest

import samples
import tensorslab
from helpers import echo_through_child
from samples import PICKLED_SCALARS, assert_same

SCALARS = samples.scalar_samples()
NATIVE = [name for name in SCALARS if name not in PICKLED_SCALARS]


@pytest.mark.parametrize("name", list(SCALARS))
def test_dumps_loads(name):
    value = SCALARS[name]
    data = tensorslab.dumps(value)
    assert isinstance(data, bytes)
    # Without allow_pickle, loads refuses pickled parts: header types must not use pickle.
    assert_same(tensorslab.loads(data, allow_pickle=name in PICKLED_SCALARS), value)


@pytest.mark.parametrize("name", list(SCALARS))
def test_channel_in_process(name):
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(SCALARS[name], timeout=10)
        assert_same(rx.get(timeout=10), SCALARS[name])


@pytest.mark.parametrize("name", NATIVE)
def test_strict_channel_sends_every_header_type(name):
    """strict=True refuses only what needs pickle; every listed type is native."""
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put(SCALARS[name], timeout=10)
        assert_same(rx.get(timeout=10), SCALARS[name])


def test_one_message_with_everything():
    message = {name: SCALARS[name] for name in NATIVE}
    message["plain"] = SCALARS["plain_object"]
    assert_same(tensorslab.loads(tensorslab.dumps(message), allow_pickle=True), message)
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put(message, timeout=10)
        assert_same(rx.get(timeout=10), message)


def test_tuple_and_list_stay_distinct():
    message = ([1, (2, [3])], ((),), [[]])
    assert_same(tensorslab.loads(tensorslab.dumps(message)), message)


def test_deep_nesting():
    message: list = []
    for depth in range(50):
        message = [message, {"depth": depth}]
    assert_same(tensorslab.loads(tensorslab.dumps(message)), message)


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_scalars_through_child(ctx_name):
    echo_through_child(ctx_name, "scalars", samples.scalar_samples())
