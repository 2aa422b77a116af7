"""What `loads(allow_pickle=False)` and a channel's receiver may find, import and build.

The hostile inputs are real `dumps` output with one part rewritten (`rewrite` below edits
the value stream and fixes the frame prefix), so each test changes one thing an attacker
controls: a field name, a class name, a member name, an item count. Each gets a
`DecodeError` that names the class, the name and the path inside the message; the
legitimate shapes of the same kinds keep round-tripping.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import struct
import sys
import threading
import typing
import warnings

import numpy as np
import pytest
import torch

import tensorslab
from helpers import run_in_child
from samples import Color, Point, Record, assert_same

# --- editing frames ------------------------------------------------------------------------

PREFIX = struct.Struct("<4sHHIIQQ")  # magic, version, flags, header_len, arrays, payload, len
PAYLOAD_ALIGN = 64


def uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def s(text: str) -> bytes:
    """A `str` of the value stream: uvarint length + UTF-8."""
    raw = text.encode()
    return uvarint(len(raw)) + raw


def rewrite(data: bytes, *edits: tuple[bytes, bytes]) -> bytes:
    """`data` (a `dumps` frame) with each `old` byte string of its value stream, which must
    occur exactly once, replaced by `new`; the prefix and payload area follow the new size."""
    magic, version, flags, header_len, arrays, payload_offset, _ = PREFIX.unpack_from(data)
    stream = data[PREFIX.size : PREFIX.size + header_len]
    for old, new in edits:
        assert stream.count(old) == 1, f"{old!r} occurs {stream.count(old)} times in {stream!r}"
        stream = stream.replace(old, new)
    payload = data[payload_offset:]
    offset = -(-(PREFIX.size + len(stream)) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN
    prefix = PREFIX.pack(magic, version, flags, len(stream), arrays, offset, offset + len(payload))
    return prefix + stream + bytes(offset - PREFIX.size - len(stream)) + payload


GLOBAL, STR, INT, LIST, DICT = b"\x18", b"\x07", b"\x03", b"\x11", b"\x12"


def global_(module: str, qualname: str) -> bytes:
    return GLOBAL + s(module) + s(qualname)


def refused(data: bytes, message: str, **loads_options) -> None:
    """`loads(data)` raises DecodeError with exactly `message`."""
    with pytest.raises(tensorslab.DecodeError) as raised:
        tensorslab.loads(data, **loads_options)
    assert str(raised.value) == message


# --- module-level types (found by name, as the decoder does) -------------------------------


@dataclasses.dataclass
class Counted:
    name: str
    total: int = dataclasses.field(init=False, default=0)
    unit: typing.ClassVar[str] = "items"

    def __post_init__(self):
        self.total = len(self.name)


@dataclasses.dataclass(frozen=True)
class Slotted:
    __slots__ = ("x", "y")
    x: int
    y: list


@dataclasses.dataclass
class Defaults:
    """A defaultdict factory that is a dataclass."""

    hits: int = 0


class Shade(enum.Enum):
    DARK = 1
    BLACK = 1  # an alias: arrives as DARK, as it was sent


# The legitimate shapes of every kind keep working without pickle.
LEGITIMATE = {
    "dataclass_init_false_field": Counted("abc"),
    "dataclass_slots_frozen": Slotted(1, [2]),
    "dataclass_in_containers": {"rec": [Record("r", [1], 2.0)]},
    "namedtuple": Point(1, (2, 3)),
    "enum_alias": Shade.BLACK,
    "defaultdict_builtin_factories": [
        collections.defaultdict(list, a=[1]),
        collections.defaultdict(int),
        collections.defaultdict(collections.Counter),
    ],
    "defaultdict_dataclass_factory": collections.defaultdict(Defaults, k=Defaults(3)),
}


@pytest.mark.parametrize("name", list(LEGITIMATE))
def test_legitimate_records_round_trip(name):
    value = LEGITIMATE[name]
    assert_same(tensorslab.loads(tensorslab.dumps(value)), value)


def test_init_false_field_keeps_the_sent_value():
    counted = Counted("abc")
    counted.total = 99  # set after __init__: the decoder sets it, never re-runs __init__
    got = tensorslab.loads(tensorslab.dumps(counted))
    assert (got.name, got.total) == ("abc", 99)


# --- dataclasses ---------------------------------------------------------------------------

RECORD = tensorslab.dumps({"rec": [Record("r", [1], 2.0)]})
VALUES_FIELD = s("values") + LIST + b"\x01" + INT + b"\x02"  # values=[1]


def test_dataclass_field_renamed_to_dunder_dict_is_refused():
    # Before: object.__setattr__(obj, "__dict__", {...}) replaced the whole instance state.
    evil_state = DICT + b"\x01" + STR + s("evil") + INT + b"\x0e"
    data = rewrite(RECORD, (VALUES_FIELD, s("__dict__") + evil_state))
    refused(
        data,
        "msg['rec'][0].__dict__: refusing to set '__dict__' on samples.Record: "
        "dunder attributes are never set",
    )


def test_dataclass_field_renamed_to_dunder_class_is_refused():
    # Before: the instance became a samples.Plain, built without calling its __init__.
    data = rewrite(RECORD, (VALUES_FIELD, s("__class__") + global_("samples", "Plain")))
    refused(
        data,
        "msg['rec'][0].__class__: refusing to set '__class__' on samples.Record: "
        "dunder attributes are never set",
    )


def test_dataclass_unknown_field_is_refused():
    data = rewrite(RECORD, (s("values"), s("extra")))
    refused(
        data,
        "msg['rec'][0].extra: samples.Record has no field 'extra' "
        "(its fields: name, values, weight)",
    )


def test_dataclass_class_variable_is_not_a_field():
    data = rewrite(tensorslab.dumps(Counted("abc")), (s("total"), s("unit")))
    refused(
        data,
        "msg.unit: test_loads_security.Counted has no field 'unit' (its fields: name, total)",
    )


def test_dataclass_duplicate_field_is_refused():
    data = rewrite(RECORD, (s("weight"), s("name")))
    refused(data, "msg['rec'][0].name: field 'name' of samples.Record appears twice")


def test_dataclass_missing_field_is_refused():
    # Missing fields are refused rather than left unset: object.__new__ runs no __init__, so
    # a field without its value would be an instance the class cannot produce.
    weight = s("weight") + b"\x05" + struct.pack("<d", 2.0)
    header = global_("samples", "Record") + b"\x03"
    data = rewrite(RECORD, (header, header[:-1] + b"\x02"), (weight, b""))
    refused(data, "msg['rec'][0]: samples.Record is missing field 'weight' (the data sets 2 of 3)")


@pytest.mark.parametrize(
    ("module", "qualname", "message"),
    [
        ("samples", "Plain", "samples.Plain is not a dataclass"),
        ("os", "system", "os.system is not a class"),
        ("builtins", "eval", "builtins.eval is not a class"),
        ("builtins", "object", "builtins.object is not a dataclass"),
    ],
)
def test_dataclass_tag_naming_another_kind_is_refused(module, qualname, message):
    data = rewrite(RECORD, (global_("samples", "Record"), global_(module, qualname)))
    refused(data, f"msg['rec'][0]: {message}")


# --- named tuples --------------------------------------------------------------------------

POINT = tensorslab.dumps([Point(1, 2)])
POINT_ITEMS = b"\x02" + INT + b"\x02" + INT + b"\x04"  # 2 items: 1, 2


@pytest.mark.parametrize(
    ("items", "count"),
    [(b"\x03" + INT + b"\x02" + INT + b"\x04" + INT + b"\x06", 3), (b"\x01" + INT + b"\x02", 1)],
)
def test_named_tuple_with_the_wrong_item_count_is_refused(items, count):
    # Before: tuple.__new__ built a Point of 3 items, whose repr then failed.
    refused(
        rewrite(POINT, (POINT_ITEMS, items)),
        f"msg[0]: samples.Point has 2 fields (x, y) but the data has {count} items",
    )


@pytest.mark.parametrize(
    ("module", "qualname", "message"),
    [
        ("builtins", "tuple", "builtins.tuple is not a named tuple class"),
        ("samples", "Record", "samples.Record is not a named tuple class"),
        ("os", "system", "os.system is not a class"),
    ],
)
def test_named_tuple_tag_naming_another_kind_is_refused(module, qualname, message):
    data = rewrite(POINT, (global_("samples", "Point"), global_(module, qualname)))
    refused(data, f"msg[0]: {message}")


# --- Enum members --------------------------------------------------------------------------

COLOR = tensorslab.dumps({"c": Color.RED})


@pytest.mark.parametrize("name", ["PURPLE", "_member_map_", "__class__", "mro", "red"])
def test_enum_member_that_does_not_exist_is_refused(name):
    refused(
        rewrite(COLOR, (s("RED"), s(name))),
        f"msg['c']: samples.Color has no member {name!r} (its members: RED, GREEN)",
    )


def test_enum_tag_naming_a_non_enum_class_is_refused():
    data = rewrite(COLOR, (global_("samples", "Color"), global_("samples", "Record")))
    refused(data, "msg['c']: samples.Record is not an Enum")


# --- class references and defaultdict factories --------------------------------------------

FACTORY = tensorslab.dumps({"d": collections.defaultdict(list)})


@pytest.mark.parametrize(
    ("module", "qualname"),
    [("subprocess", "Popen"), ("multiprocessing.pool", "ThreadPool"), ("threading", "Thread")],
)
def test_defaultdict_factory_must_be_a_class_loads_may_call(module, qualname):
    # Before: any class was accepted, and the receiver called it (Popen(), ThreadPool()...)
    # on the first missing key.
    __import__(module)  # imported: this test is about calling, not importing
    data = rewrite(FACTORY, (global_("builtins", "list"), global_(module, qualname)))
    refused(
        data,
        f"msg['d'].default_factory: {module}.{qualname} is not a defaultdict factory "
        "loads(allow_pickle=False) calls (builtin and collections types, dataclasses and "
        "named tuples are); pass allow_pickle=True only for data you trust",
    )
    # Data you trust may name any class, as a pickle could.
    trusted = tensorslab.loads(data, allow_pickle=True)
    assert trusted["d"].default_factory is getattr(sys.modules[module], qualname)


@pytest.mark.parametrize(("module", "qualname"), [("os", "system"), ("builtins", "eval")])
def test_defaultdict_factory_that_is_a_function_is_refused(module, qualname):
    data = rewrite(FACTORY, (global_("builtins", "list"), global_(module, qualname)))
    for allow_pickle in (False, True):
        refused(
            data,
            f"msg['d'].default_factory: {module}.{qualname} is not a class",
            allow_pickle=allow_pickle,
        )


def test_class_reference_outside_a_defaultdict_factory_is_refused():
    # Before: loads returned the class itself (any class of any imported module).
    data = rewrite(tensorslab.dumps([True]), (b"\x02", global_("subprocess", "Popen")))
    for allow_pickle in (False, True):
        refused(
            data,
            "msg[0]: a class reference (subprocess.Popen) outside a defaultdict factory",
            allow_pickle=allow_pickle,
        )


# --- what is looked up and imported --------------------------------------------------------

UNIMPORTED = "tsl_untrusted_module"


@pytest.fixture
def unimported_module(tmp_path, monkeypatch):
    """A module on sys.path that no one imported; importing it records that it ran."""
    (tmp_path / f"{UNIMPORTED}.py").write_text(
        "import dataclasses, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'ran')!r}).write_text('module code ran')\n"
        "@dataclasses.dataclass\n"
        "class Thing:\n"
        "    name: str\n"
        "    values: list\n"
        "    weight: float = 1.0\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, UNIMPORTED, raising=False)
    yield tmp_path / "ran"
    sys.modules.pop(UNIMPORTED, None)


def test_loads_imports_no_module(unimported_module):
    # Importing runs the module's code: a frame naming `unittest.__main__` made loads run
    # unittest discovery (the test files of the current directory) before this rule.
    data = rewrite(RECORD, (global_("samples", "Record"), global_(UNIMPORTED, "Thing")))
    refused(
        data,
        f"msg['rec'][0]: cannot find {UNIMPORTED}.Thing: module {UNIMPORTED} is not imported "
        "in this process, and loads(allow_pickle=False) imports nothing (importing runs the "
        "module's code); import it before loading, or pass allow_pickle=True only for data "
        "you trust",
    )
    assert not unimported_module.exists(), "loads ran the code of a module the data named"
    assert UNIMPORTED not in sys.modules
    # Trusted data imports what it names, as pickle does.
    got = tensorslab.loads(data, allow_pickle=True)
    assert unimported_module.exists()
    assert type(got["rec"][0]).__module__ == UNIMPORTED
    # Once imported (by anyone), untrusted data may name it too.
    assert tensorslab.loads(data)["rec"][0].values == [1]


def test_lookup_never_runs_module_getattr():
    # torch's module __getattr__ warns for "set_vital" (and imports torch._dynamo for
    # "_dynamo", calls functions for deprecated names): a lookup must read the module's
    # namespace, never call into it.
    data = rewrite(RECORD, (global_("samples", "Record"), global_("torch", "set_vital")))
    torch_dtype = rewrite(tensorslab.dumps(torch.float32), (s("float32"), s("set_vital")))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        refused(
            data, "msg['rec'][0]: cannot find torch.set_vital: torch has no attribute set_vital"
        )
        refused(torch_dtype, "msg: torch has no dtype 'set_vital' (a newer torch sent it?)")
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize(
    "qualname", ["Record.__class__", "__builtins__.eval", "__loader__", "Record.__init__"]
)
def test_dunder_names_are_not_looked_up(qualname):
    data = rewrite(RECORD, (global_("samples", "Record"), global_("samples", qualname)))
    for allow_pickle in (False, True):
        refused(
            data,
            f"msg['rec'][0]: cannot find samples.{qualname}: dunder names are not looked up",
            allow_pickle=allow_pickle,
        )


# --- through a channel ---------------------------------------------------------------------


@dataclasses.dataclass
class SpawnVersioned:
    """A message type of which `send_newer_version` sends a version with one more field."""

    key: str


@dataclasses.dataclass
class ForkVersioned:
    """As `SpawnVersioned`: a fork child inherits the lookups this process has cached, so
    each start method gets a class no earlier test has looked up."""

    key: str


def send_newer_version(tx, name):
    """As a process whose class `name` has a field this one lacks: send one."""
    newer = dataclasses.make_dataclass(name, [("key", str), ("added", int)])
    newer.__module__ = __name__
    setattr(sys.modules[__name__], name, newer)
    tx.put({"batch": [newer("k", 1)]}, timeout=60)
    tx.close()


@pytest.mark.parametrize("ctx_name", ["spawn", "fork"])
def test_channel_receiver_sets_only_declared_fields(ctx_name):
    name = f"{ctx_name.title()}Versioned"
    tx, rx = tensorslab.channel(strict=True)
    with tx, rx:
        run_in_child(ctx_name, send_newer_version, tx, name)
        with pytest.raises(tensorslab.DecodeError) as raised:
            rx.get(timeout=10)
    assert str(raised.value) == (
        f"msg['batch'][0].added: test_loads_security.{name} has no field 'added' (its fields: key)"
    )


# --- threads -------------------------------------------------------------------------------

THREADS = 8
ROUNDS = 10000


def decode_from_threads(frames):
    """Decode `frames` from many threads at once, switching threads as often as possible.

    Before: `Torch::dtype_named` held a Rust mutex across `getattr(torch, name)`, which for
    a name torch lacks runs torch's module __getattr__ (Python code, so the GIL can pass to
    another thread); a second thread then waited for the mutex while holding the GIL, and
    neither could go on. The child hangs and `run_in_child` kills it.
    """
    sys.setswitchinterval(1e-6)
    errors = []

    def work():
        for _ in range(ROUNDS):
            for frame in frames:
                try:
                    tensorslab.loads(frame)
                except tensorslab.DecodeError:
                    pass
                except BaseException as error:
                    errors.append(repr(error))

    threads = [threading.Thread(target=work, daemon=True) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(100)
    assert not any(thread.is_alive() for thread in threads), "decoding threads hung"
    return errors


def test_decoding_from_many_threads_does_not_deadlock():
    float32 = tensorslab.dumps(torch.float32)
    names = ["float32", "no_such_dtype", "bfloat16", "float99", "int8", "complex64", "bogus"]
    frames = [rewrite(float32, (s("float32"), s(name))) for name in names]
    frames += [tensorslab.dumps([Record("r", [1], 2.0), Color.GREEN, Point(1, 2)])]
    frames += [tensorslab.dumps(np.zeros(2, dtype)) for dtype in ["<f4", ">i8", "S3", "<m8[s]"]]
    assert run_in_child("fork", decode_from_threads, frames, timeout=90) == []


def test_dtype_cache_stays_bounded():
    # Dtype texts come from the data, and "|S1", "|S2", ... are all valid: each one used to
    # stay cached for the life of the process.
    for size in range(100_000, 101_100):  # more texts than the cache keeps
        tensorslab.loads(tensorslab.dumps(np.zeros(0, f"S{size}")))
    fresh = tensorslab.dumps(np.zeros(0, "S99999"))
    assert tensorslab.loads(fresh).dtype is not tensorslab.loads(fresh).dtype
