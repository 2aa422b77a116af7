"""The header codec: random nested values round-trip (hypothesis), and hostile bytes only
ever raise DecodeError (a fuzz loop in a child process, so a crash fails one test instead
of taking the session down)."""

from __future__ import annotations

import collections
import datetime as dt

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import children
import tensorslab
from helpers import run_in_child
from samples import Color, Level, Plain, Point, Record, assert_same

# Surrogates included: str must carry any code point, lone surrogates too.
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)

HASHABLE = st.recursive(
    st.none() | st.booleans() | st.integers() | TEXT | st.binary(max_size=12),
    lambda inner: st.tuples(inner, inner) | st.frozensets(inner, max_size=3),
    max_leaves=6,
)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**300), max_value=2**300)
    | st.floats()
    | st.complex_numbers()
    | TEXT
    | st.binary(max_size=64)
    | st.binary(max_size=64).map(bytearray)
    | st.decimals()
    | st.datetimes(timezones=st.none() | st.timezones())
    | st.dates()
    | st.times(timezones=st.none() | st.timezones())
    | st.timedeltas()
    | st.uuids()
    | st.builds(slice, st.integers(), st.none() | st.integers(), st.none() | st.integers())
    | st.builds(range, st.integers(-100, 100), st.integers(-100, 100), st.sampled_from([1, -3]))
    | st.sampled_from(
        [
            Ellipsis,
            Color.RED,
            Color.GREEN,
            Level.HIGH,
            torch.float16,
            torch.Size([2, 0]),
            torch.device("cpu"),
            np.dtype("<f4"),
            np.dtype([("a", "u1"), ("b", ">f8")]),
        ]
    )
    | st.integers(-(2**63), 2**63 - 1).map(np.int64)
    | st.floats(width=32).map(np.float32)
    | st.booleans().map(np.bool_)
)


def containers(inner):
    return (
        st.lists(inner, max_size=4)
        | st.lists(inner, max_size=4).map(tuple)
        | st.dictionaries(HASHABLE, inner, max_size=4)
        | st.dictionaries(TEXT, inner, max_size=4).map(collections.OrderedDict)
        | st.dictionaries(TEXT, inner, max_size=3).map(lambda d: collections.defaultdict(list, d))
        | st.dictionaries(TEXT, st.integers(), max_size=4).map(collections.Counter)
        | st.sets(HASHABLE, max_size=4)
        | st.frozensets(HASHABLE, max_size=4)
        | st.builds(Point, inner, inner)
        | st.builds(Record, TEXT, st.lists(inner, max_size=3), st.floats())
    )


VALUES = st.recursive(SCALARS, containers, max_leaves=25)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_random_values_round_trip(value):
    assert_same(tensorslab.loads(tensorslab.dumps(value)), value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(VALUES)
def test_random_values_through_a_channel(value):
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put({"value": value}, timeout=10)
        assert_same(rx.get(timeout=10)["value"], value)


NUMERIC_DTYPES = (
    hnp.integer_dtypes(endianness="=")
    | hnp.unsigned_integer_dtypes(endianness="=")
    | hnp.floating_dtypes(endianness="=", sizes=(16, 32, 64))
    | hnp.complex_number_dtypes(endianness="=")
    | hnp.boolean_dtypes()
    | hnp.datetime64_dtypes(endianness="=")
)


@st.composite
def arrays_with_layouts(draw):
    """A random array, then maybe a transposed, reversed or strided view of it."""
    array = draw(hnp.arrays(NUMERIC_DTYPES, hnp.array_shapes(min_dims=0, max_dims=3, min_side=0)))
    layout = draw(st.sampled_from(["as is", "transposed", "reversed", "every other"]))
    if layout == "transposed":
        array = array.T
    elif layout == "reversed" and array.ndim:
        array = array[::-1]
    elif layout == "every other" and array.ndim:
        array = array[..., ::2]
    return array


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays_with_layouts())
def test_random_arrays_through_a_channel(array):
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        tx.put([array, {"again": array}], timeout=10)
        got = rx.get(timeout=10)
        assert_same(got[0], array)
        assert got[1]["again"] is got[0]
        del got


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arrays_with_layouts())
def test_random_arrays_dumps_loads(array):
    assert_same(tensorslab.loads(tensorslab.dumps(array)), array)


def valid_messages() -> list[bytes]:
    """Small, varied, valid encodings: every truncation of each is fed to loads."""
    return [
        tensorslab.dumps(value)
        for value in [
            None,
            12345678901234567890123,
            "naïve ✓",
            [1.5, -0.0, float("nan"), 2j, b"bytes", bytearray(b"ba")],
            {"key": (1, 2), 3: {4, 5}, "nested": [frozenset({"x"}), Point(1, 2)]},
            collections.OrderedDict(a=collections.Counter("aab"), b=Record("r", [1], 2.0)),
            (dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.timezone.utc), dt.timedelta(days=2)),
            {"array": np.arange(12, dtype=np.float32).reshape(3, 4), "tensor": torch.ones(3)},
            np.zeros(3, dtype=[("a", "<i4"), ("b", "S2")]),
            [Level.LOW, Color.GREEN, slice(1, None), range(3), Ellipsis, torch.bfloat16],
            {"pickled": Plain(1, "two")},
        ]
    ]


def test_hostile_bytes_raise_decode_error_only():
    messages = valid_messages()
    # Mutations may happen to decode (a flipped byte inside a string); random bytes and
    # truncations never may. Anything but DecodeError, or a crash, is a failure.
    failures, _ = run_in_child("fork", children.fuzz_loads, messages, 20240601, 2000, timeout=110)
    assert not failures, f"{len(failures)} inputs misbehaved:\n  " + "\n  ".join(failures[:30])
