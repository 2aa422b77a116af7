"""Values the tests send, the module-level types they need, and an exact comparison.

Every builder returns fresh, deterministic values, so a child process can build the same
samples and compare what it received against its own copy. Types are defined here, at
module level, because tensorslab (like pickle) finds a namedtuple, dataclass or Enum class
on arrival by module and qualified name.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import enum
import math
import random
import uuid
import zoneinfo
from decimal import Decimal
from typing import Any, NamedTuple

import numpy as np
import torch

# --- types ---------------------------------------------------------------------------------

Point = collections.namedtuple("Point", ["x", "y"])


class TypedPoint(NamedTuple):
    x: int
    y: float = 0.5


@dataclasses.dataclass
class Record:
    name: str
    values: list
    weight: float = 1.0


@dataclasses.dataclass(frozen=True)
class FrozenRecord:
    key: int
    parts: tuple


class Color(enum.Enum):
    RED = 1
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Plain:
    """A user class tensorslab has no encoding for: it must go through pickle."""

    def __init__(self, a, b):
        self.a = a
        self.b = b

    def __eq__(self, other):
        return type(other) is Plain and (self.a, self.b) == (other.a, other.b)

    def __hash__(self):
        return hash(("Plain", self.a))

    def __repr__(self):
        return f"Plain({self.a!r}, {self.b!r})"


# --- samples -------------------------------------------------------------------------------

PARIS = "Europe/Paris"

# Samples that need pickle (refused with strict=True, and by loads without allow_pickle).
PICKLED_SCALARS = frozenset({"plain_object", "nested_with_plain"})
PICKLED_ARRAYS = frozenset({"object", "unicode"})


def scalar_samples() -> dict[str, Any]:
    """Every non-array type of the header, alone, by test id."""
    paris = zoneinfo.ZoneInfo(PARIS)
    plus_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))
    samples: dict[str, Any] = {
        "none": None,
        "true": True,
        "false": False,
        "int_zero": 0,
        "int_small": 42,
        "int_negative": -7,
        "int_i64_max": 2**63 - 1,
        "int_i64_min": -(2**63),
        "int_u64_max": 2**64 - 1,
        "int_2_64": 2**64,
        "int_huge": 2**200,
        "int_huge_negative": -(2**200) + 12345,
        "float": 1.5,
        "float_tiny": 5e-324,
        "float_nan": float("nan"),
        "float_negative_zero": -0.0,
        "float_inf": float("inf"),
        "float_negative_inf": float("-inf"),
        "complex": 1.5 - 2j,
        "complex_nan_negative_zero": complex(float("nan"), -0.0),
        "str_empty": "",
        "str_ascii": "hello tensorslab",
        "str_unicode": "héllo wörld ✓ 日本語 🎉 \x00 end",
        "str_lone_surrogate": "a\ud800b",
        "bytes_empty": b"",
        "bytes_small": bytes(range(256)),
        "bytes_10mb": random.Random(0).randbytes(10 << 20),
        "bytearray": bytearray(b"mutable\x00bytes"),
        "tuple_empty": (),
        "tuple": (1, "a", None, 2.5),
        "list_empty": [],
        "list": [1, [2, [3, [4]]], "x"],
        "dict_empty": {},
        "dict_order": {"zeta": 1, "alpha": 2, "mid": 3},
        "dict_int_tuple_str_keys": {3: "int", (1, "a"): "tuple", "s": "str", -1: [1]},
        "dict_other_keys": {None: 0, b"raw": 1, 2.5: 2, frozenset({1, 2}): 3, True: 4},
        "ordered_dict": collections.OrderedDict([("z", 1), ("a", 2), ("m", [3])]),
        "defaultdict_list": collections.defaultdict(list, {"a": [1, 2], "b": []}),
        "defaultdict_int": collections.defaultdict(int, {"x": 3}),
        "counter": collections.Counter("abracadabra"),
        "set": {1, 2, 3},
        "set_mixed": {1, "a", (1, 2), None},
        "set_empty": set(),
        "frozenset": frozenset({"a", "b"}),
        "frozenset_empty": frozenset(),
        "namedtuple": Point(1, [2, 3]),
        "typing_namedtuple": TypedPoint(3),
        "dataclass": Record("r", [1, 2.5], weight=-0.0),
        "dataclass_frozen": FrozenRecord(7, ("a", b"b")),
        "enum": Color.RED,
        "enum_str_value": Color.GREEN,
        "int_enum": Level.HIGH,
        "np_dtype": np.dtype("float32"),
        "np_dtype_big_endian": np.dtype(">i4"),
        "np_dtype_structured": np.dtype([("a", "<i4"), ("b", "<f8", (2,)), ("c", "S3")]),
        "np_dtype_datetime": np.dtype("datetime64[ns]"),
        "np_float32": np.float32(1.5),
        "np_float64": np.float64(-2.25),
        "np_float16": np.float16(0.5),
        "np_int64": np.int64(-3),
        "np_uint8": np.uint8(255),
        "np_bool": np.bool_(True),
        "np_complex64": np.complex64(1 + 2j),
        "np_datetime64": np.datetime64("2024-02-29T12:00:00", "s"),
        "torch_dtype": torch.float32,
        "torch_dtype_bfloat16": torch.bfloat16,
        "torch_size": torch.Size([2, 3, 4]),
        "torch_size_empty": torch.Size([]),
        "torch_device_cpu": torch.device("cpu"),
        "torch_device_cuda_1": torch.device("cuda", 1),
        "slice": slice(1, 10, 2),
        "slice_none": slice(None),
        "slice_objects": slice("a", None, -1),
        "range": range(0, 10, 3),
        "range_negative": range(5, -5, -2),
        "range_empty": range(7, 7),
        "ellipsis": Ellipsis,
        "datetime_naive": dt.datetime(2024, 2, 29, 12, 34, 56, 789012),
        "datetime_utc": dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc),
        "datetime_offset": dt.datetime(1999, 12, 31, 23, 59, 59, tzinfo=plus_0530),
        "datetime_named_offset": dt.datetime(
            2020, 5, 17, tzinfo=dt.timezone(dt.timedelta(hours=-3), "BRT")
        ),
        "datetime_zoneinfo": dt.datetime(2024, 7, 14, 9, 0, tzinfo=paris),
        "datetime_zoneinfo_fold": dt.datetime(2021, 10, 31, 2, 30, fold=1, tzinfo=paris),
        "date": dt.date(2000, 1, 1),
        "time": dt.time(23, 59, 59, 999999),
        "time_offset": dt.time(8, 15, tzinfo=plus_0530),
        "timedelta": dt.timedelta(days=-1, seconds=5, microseconds=7),
        "timedelta_large": dt.timedelta(days=999999999),
        "decimal": Decimal("3.14159"),
        "decimal_exponent": Decimal("1.000E+1000"),
        "decimal_negative_zero": Decimal("-0.00"),
        "decimal_nan": Decimal("NaN"),
        "decimal_negative_infinity": Decimal("-Infinity"),
        "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
        "uuid5": uuid.uuid5(uuid.NAMESPACE_DNS, "tensorslab.example"),
        "plain_object": Plain(1, [2, "three"]),
    }
    everything = {name: value for name, value in samples.items() if name not in PICKLED_SCALARS}
    samples["nested_everything"] = {
        "all": dict(everything),
        "as_list": [everything["tuple"], [everything["set"], (everything["counter"],)]],
        "deep": [[[[[[[[[[{"bottom": (Level.LOW, None)}]]]]]]]]]],
    }
    samples["nested_with_plain"] = {"batch": [1, Plain("x", None), Record("y", [Plain(0, 0)])]}
    return samples


def array_samples() -> dict[str, np.ndarray]:
    """NumPy arrays: every numeric dtype and the awkward layouts, by test id."""
    rng = np.random.default_rng(0)
    samples: dict[str, np.ndarray] = {}
    for name in ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]:
        samples[name] = np.arange(-12, 12).astype(name).reshape(4, 6)
    for name in ["float16", "float32", "float64", "longdouble"]:
        values = rng.standard_normal((4, 6)).astype(name)
        values.flat[:4] = [np.nan, -0.0, np.inf, -np.inf]
        samples[name] = values
    for name in ["complex64", "complex128", "clongdouble"]:
        values = (rng.standard_normal((3, 5)) + 1j * rng.standard_normal((3, 5))).astype(name)
        values.flat[0] = complex(np.nan, -0.0)
        samples[name] = values
    samples["bool"] = np.arange(20).reshape(4, 5) % 3 == 0
    samples["datetime64_ns"] = np.array(
        ["2024-01-01T12:00:00.123456789", "NaT", "1970-01-01"], dtype="datetime64[ns]"
    )
    samples["datetime64_day"] = np.arange("2024-02-25", "2024-03-03", dtype="datetime64[D]")
    samples["timedelta64_s"] = np.array([1, -5, 0, np.timedelta64("NaT")], dtype="timedelta64[s]")
    record = np.dtype([("id", "<i4"), ("pos", "<f8", (3,)), ("name", "S5"), ("flag", "?")])
    structured = np.zeros(4, dtype=record)
    structured["id"] = [1, 2, 3, 4]
    structured["pos"] = rng.standard_normal((4, 3))
    structured["name"] = [b"a", b"bb", b"ccc", b"ddddd"]
    structured["flag"] = [True, False, True, False]
    samples["structured"] = structured
    nested = np.zeros(3, dtype=[("inner", [("a", "<i2"), ("b", "<f4")]), ("c", "<u8")])
    nested["inner"]["a"] = [1, -2, 3]
    nested["inner"]["b"] = [0.5, 1.5, -2.5]
    nested["c"] = [2**64 - 1, 0, 7]
    samples["structured_nested"] = nested
    base = np.arange(60, dtype="float64").reshape(5, 12)
    samples["transposed"] = base.T
    samples["sliced"] = base[1:4, ::3]
    samples["negative_strides"] = base[::-1, ::-2]
    samples["fortran_order"] = np.asfortranarray(rng.standard_normal((3, 4)))
    samples["broadcast_zero_stride"] = np.broadcast_to(np.arange(3, dtype="int32"), (4, 3))
    samples["big_endian_f4"] = np.arange(10, dtype=">f4")
    samples["big_endian_i8"] = np.arange(-5, 5, dtype=">i8").reshape(2, 5)
    samples["big_endian_c16"] = np.array([1 + 2j, -3j], dtype=">c16")
    samples["zero_d"] = np.array(3.5)
    samples["zero_d_big_endian"] = np.array(-7, dtype=">i2")
    samples["zero_size"] = np.zeros((0, 3))
    samples["zero_size_3d"] = np.zeros((4, 0, 2), dtype="float32")
    samples["zero_size_structured"] = np.zeros(0, dtype=record)
    samples["large_16mib"] = rng.standard_normal(4 << 20).astype("float32")
    samples["object"] = np.array([1, "a", None, [2]], dtype=object)
    samples["unicode"] = np.array(["a", "bc", "日本"])
    return samples


def tensor_samples() -> dict[str, torch.Tensor]:
    """torch tensors: every listed dtype, grads, Parameters and layouts, by test id."""
    generator = torch.Generator().manual_seed(0)
    samples: dict[str, torch.Tensor] = {}
    for dtype in [
        torch.float32,
        torch.float64,
        torch.float16,
        torch.bfloat16,
        torch.int8,
        torch.int16,
        torch.int32,
        torch.int64,
        torch.uint8,
    ]:
        samples[str(dtype).removeprefix("torch.")] = torch.arange(-12, 12).reshape(4, 6).to(dtype)
    samples["bool"] = torch.arange(20).reshape(4, 5) % 3 == 0
    samples["complex64"] = torch.complex(
        torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    )
    samples["complex128"] = samples["complex64"].to(torch.complex128)
    samples["float_specials"] = torch.tensor([math.nan, -0.0, math.inf, -math.inf, 1.0])
    samples["requires_grad"] = torch.randn(3, 4, generator=generator).requires_grad_()
    samples["parameter"] = torch.nn.Parameter(torch.randn(2, 3, generator=generator))
    samples["parameter_frozen"] = torch.nn.Parameter(torch.ones(2), requires_grad=False)
    base = torch.arange(60, dtype=torch.float32).reshape(5, 12)
    samples["transposed"] = base.T
    samples["sliced"] = base[1:4, ::3]
    samples["expanded_zero_stride"] = base[:1].expand(4, 12)
    samples["channels_last"] = torch.randn(2, 3, 4, 5, generator=generator).to(
        memory_format=torch.channels_last
    )
    samples["zero_d"] = torch.tensor(3.5)
    samples["zero_size"] = torch.empty(0, 3)
    samples["large_16mib"] = torch.randn(4 << 20, generator=generator)
    return samples


def state_dict_sample() -> collections.OrderedDict:
    """A real module's state_dict, deterministic."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2)
        )
    return model.state_dict()


def build(kind: str) -> dict[str, Any]:
    """Samples by kind name, for children that compare against their own copy."""
    return {
        "scalars": scalar_samples,
        "arrays": array_samples,
        "tensors": tensor_samples,
    }[kind]()


# --- exact comparison ----------------------------------------------------------------------


def _same_float(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)


def _array_bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.dtype.names:
        return all(_array_bytes_equal(a[name], b[name]) for name in a.dtype.names)
    if a.dtype.kind == "O":
        return a.shape == b.shape and all(x == y for x, y in zip(a.flat, b.flat))
    if a.dtype in (np.dtype(np.longdouble), np.dtype(np.clongdouble)):
        # 80-bit extended precision sits in 16 bytes: the padding bytes are garbage.
        return bool(np.array_equal(a, b, equal_nan=True)) and bool(
            np.array_equal(np.signbit(a.real), np.signbit(b.real))
        )
    return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()


def _tensor_values_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.is_floating_point() or a.is_complex():
        if not torch.equal(torch.isnan(a), torch.isnan(b)):
            return False
        keep = ~torch.isnan(a)
        if not torch.equal(a[keep], b[keep]):
            return False
        if a.is_floating_point():
            return torch.equal(torch.signbit(a[keep]), torch.signbit(b[keep]))
        return True
    return torch.equal(a, b)


def differences(got: Any, expected: Any, path: str = "value") -> list[str]:
    """Every way `got` differs from `expected`: type, value, order, nesting. [] if same."""
    if type(got) is not type(expected):
        return [f"{path}: type {type(got).__qualname__}, expected {type(expected).__qualname__}"]
    diffs: list[str] = []
    if isinstance(expected, float):
        if not _same_float(got, expected):
            diffs.append(f"{path}: {got!r} != {expected!r}")
    elif isinstance(expected, complex):
        if not (_same_float(got.real, expected.real) and _same_float(got.imag, expected.imag)):
            diffs.append(f"{path}: {got!r} != {expected!r}")
    elif isinstance(expected, Decimal):
        if str(got) != str(expected):
            diffs.append(f"{path}: Decimal {got} != {expected}")
    elif isinstance(expected, (dt.datetime, dt.time)):
        if repr(got) != repr(expected) or got.fold != expected.fold:
            diffs.append(f"{path}: {got!r} != {expected!r}")
    elif isinstance(expected, range):
        if (got.start, got.stop, got.step) != (expected.start, expected.stop, expected.step):
            diffs.append(f"{path}: {got!r} != {expected!r}")
    elif isinstance(expected, np.ndarray):
        if got.dtype != expected.dtype:
            diffs.append(f"{path}: dtype {got.dtype.str} != {expected.dtype.str}")
        elif got.shape != expected.shape:
            diffs.append(f"{path}: shape {got.shape} != {expected.shape}")
        elif not _array_bytes_equal(got, expected):
            diffs.append(f"{path}: array values differ:\n{got!r}\n!=\n{expected!r}")
    elif isinstance(expected, np.generic):
        if got.dtype != expected.dtype or got.tobytes() != expected.tobytes():
            diffs.append(f"{path}: {got!r} ({got.dtype}) != {expected!r} ({expected.dtype})")
    elif isinstance(expected, np.dtype):
        if got != expected or got.descr != expected.descr:
            diffs.append(f"{path}: dtype {got!r} != {expected!r}")
    elif isinstance(expected, torch.Tensor):
        for attribute in ("dtype", "shape", "requires_grad", "device"):
            if getattr(got, attribute) != getattr(expected, attribute):
                diffs.append(
                    f"{path}.{attribute}: {getattr(got, attribute)} "
                    f"!= {getattr(expected, attribute)}"
                )
        if not diffs and not _tensor_values_equal(got, expected):
            diffs.append(f"{path}: tensor values differ:\n{got!r}\n!=\n{expected!r}")
    elif isinstance(expected, dict):
        if list(got.keys()) != list(expected.keys()):
            diffs.append(f"{path}: keys {list(got)!r} != {list(expected)!r} (order counts)")
        else:
            for key in expected:
                diffs.extend(differences(got[key], expected[key], f"{path}[{key!r}]"))
        if isinstance(expected, collections.defaultdict):
            if got.default_factory is not expected.default_factory:
                diffs.append(
                    f"{path}.default_factory: {got.default_factory!r} "
                    f"!= {expected.default_factory!r}"
                )
    elif isinstance(expected, (list, tuple)):
        if len(got) != len(expected):
            diffs.append(f"{path}: length {len(got)} != {len(expected)}")
        else:
            for index, (g, e) in enumerate(zip(got, expected)):
                diffs.extend(differences(g, e, f"{path}[{index}]"))
    elif isinstance(expected, (set, frozenset)):
        if got != expected:
            diffs.append(f"{path}: {got!r} != {expected!r}")
    elif dataclasses.is_dataclass(expected):
        for field in dataclasses.fields(expected):
            diffs.extend(
                differences(
                    getattr(got, field.name), getattr(expected, field.name), f"{path}.{field.name}"
                )
            )
    elif isinstance(expected, enum.Enum):
        if got is not expected:
            diffs.append(f"{path}: {got!r} is not {expected!r}")
    elif not got == expected:
        diffs.append(f"{path}: {got!r} != {expected!r}")
    return diffs


def assert_same(got: Any, expected: Any, path: str = "value") -> None:
    """Fail with every difference between `got` and `expected` (see `differences`)."""
    diffs = differences(got, expected, path)
    assert not diffs, "round trip changed the value:\n  " + "\n  ".join(d[:2000] for d in diffs)


def leaves(value: Any):
    """Yield every array and tensor inside a nested value."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from leaves(item)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from leaves(item)


class DLPackOnly:
    """An array-like that is neither an ndarray nor a tensor but exports DLPack."""

    def __init__(self, array: np.ndarray):
        self._array = array

    def __dlpack__(self, *args, **kwargs):
        return self._array.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self._array.__dlpack_device__()
