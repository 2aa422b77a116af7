"""Sizes computed from Python input never wrap: a message, an `alloc` shape or a `dumps`
value whose byte count overflows fails with a ValueError naming where and how much, keeps
nothing allocated and leaves the channel usable.

Before this was checked, release builds (which do not check overflow) summed the payloads
of `[view] * n` of huge zero-stride views to a few KiB, allocated that, and copied past it
(SIGSEGV), and a torch tensor of 2**64 bytes was sent as an empty payload. Every case that
crashed once runs in a child process (`in_fork`), so a regression fails one test instead of
killing pytest.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import pickle
import select
import signal
import subprocess
import sys
import time
import traceback

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import tensorslab

ISIZE_MAX = 2**63 - 1
HUGE = 2**62
MiB = 1 << 20


class ChildFailed(AssertionError):
    """The forked child raised, died from a signal or hung."""


def in_fork(function, *args, timeout: float = 60):
    """Runs ``function(*args)`` in a forked child and returns what it returned; fails with
    the child's traceback if it raised, with the signal if it died, killed if it hung."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running the parent's cleanup
        code = 0
        try:
            os.close(read_fd)
            # The parent's objects are not the child's business: collections skip them
            # (fast, and no copy-on-write of the whole heap), and a crash is reported by
            # its signal, without pytest's faulthandler dump.
            gc.freeze()
            faulthandler.disable()
            if "torch" in sys.modules:
                # As in tests/children.py: a fork child of a process that already ran
                # OpenMP-parallel torch ops hangs in its first parallel op unless it stays
                # on one thread (GNU libgomp is not fork-safe). Not a tensorslab matter.
                sys.modules["torch"].set_num_threads(1)
            try:
                outcome = ("returned", function(*args))
            except BaseException:
                outcome = ("raised", traceback.format_exc())
            with os.fdopen(write_fd, "wb") as out:
                out.write(pickle.dumps(outcome))
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + timeout
    with os.fdopen(read_fd, "rb", buffering=0) as source:
        while True:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([source], [], [], max(0.0, left))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildFailed(f"child {pid} still running after {timeout} s: killed")
            chunk = source.read(1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        raise ChildFailed(f"child {pid} was killed by {name}")
    kind, value = pickle.loads(b"".join(chunks))
    if kind == "raised":
        raise ChildFailed(f"child {pid} raised:\n{value}")
    return value


def huge_view(length: int = HUGE) -> np.ndarray:
    """A zero-stride uint8 view of `length` bytes: a few bytes of memory, `length` bytes of
    payload."""
    return np.broadcast_to(np.zeros(1, np.uint8), (length,))


def occupancy(handle) -> tuple[int, int]:
    gc.collect()
    stats = handle.stats()
    return stats["slab_used_bytes"], stats["messages_in_flight"]


def still_works(tx, rx) -> None:
    tx.put({"after": "error", "a": np.arange(5)}, timeout=10)
    got = rx.get(timeout=10)
    assert got["after"] == "error" and np.array_equal(got["a"], np.arange(5))


def refused(call, *fragments: str) -> str:
    """Runs `call`, which must raise a ValueError whose message holds every fragment."""
    with pytest.raises(ValueError) as caught:
        call()
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def refused_put(value, *fragments: str, via_queue: bool = False) -> str:
    """`put` of `value` raises a ValueError naming `fragments`; afterwards the channel
    holds what it held before and still carries messages."""
    if via_queue:
        queue = tensorslab.Queue()
        tx, rx = queue._tx, queue._rx
        put = queue.put
    else:
        tx, rx = tensorslab.channel()
        put = tx.put
    with tx, rx:
        tx.put("warm-up", timeout=10)
        assert rx.get(timeout=10) == "warm-up"
        before = occupancy(tx)
        message = refused(lambda: put(value, timeout=10), *fragments)
        assert occupancy(tx) == before, "the failed put kept slab memory"
        still_works(tx, rx)
    return message


# ---- the reproduction of the issue, and the sums that wrapped ----------------------------

REPRODUCTION = """
import numpy as np, tensorslab
tx, rx = tensorslab.channel()
try:
    tx.put({value}, timeout=10)
except ValueError as error:
    print("ValueError:", error)
"""


@pytest.mark.parametrize(
    "value",
    [
        # As the issue wrote it: one object four times is sent once (an ArrayRef), so its
        # single payload of 2**62 bytes is refused for exceeding max_slab_bytes.
        "[np.broadcast_to(np.zeros(1, np.uint8), (2**62,))] * 4",
        # Four distinct views: four payloads whose sum wrapped.
        "[np.broadcast_to(np.zeros(1, np.uint8), (2**62,)) for _ in range(4)]",
    ],
)
def test_issue_reproduction_raises_instead_of_crashing(value):
    script = REPRODUCTION.format(value=value)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, (
        f"exit status {done.returncode}"
        + (f" ({signal.Signals(-done.returncode).name})" if done.returncode < 0 else "")
        + f"; stderr:\n{done.stderr}"
    )
    assert done.stdout.startswith("ValueError:"), done.stdout + done.stderr


def test_put_of_payloads_summing_past_the_address_space():
    # 2 * 2**62 bytes is past isize::MAX: the second view is the one that does not fit.
    message = in_fork(lambda: refused_put([huge_view() for _ in range(4)], "msg[1]"))
    assert str(HUGE) in message


def test_queue_put_of_payloads_summing_past_the_address_space():
    in_fork(lambda: refused_put([huge_view(), huge_view()], "msg[1]", via_queue=True))


def test_nested_payload_sum_names_the_path():
    value = {"a": [huge_view(), {"b": (huge_view(),)}]}
    in_fork(lambda: refused_put(value, "msg['a'][1]['b'][0]"))


def test_dumps_of_payloads_summing_past_the_address_space():
    in_fork(lambda: refused(lambda: tensorslab.dumps([huge_view(), huge_view()]), "msg[1]"))


def test_many_small_arrays_then_one_past_the_limit():
    # Thousands of ordinary payloads, then views whose sum wraps: the sum is checked at
    # every step, not only for the first few arrays.
    def run():
        value = [np.arange(i % 7) for i in range(3000)] + [huge_view(), huge_view()]
        refused_put(value, "msg[3001]")

    in_fork(run)


@pytest.mark.parametrize(
    ("length", "dtype"),
    [
        (2**62, torch.float32),  # 2**64 bytes: wrapped to 0 and was sent as an empty payload
        (2**62 + 1, torch.float32),  # wrapped to 4 bytes, then gathered 2**62 elements into them
        (2**61, torch.float64),
        (2**60, torch.complex128),
    ],
)
def test_expanded_tensor_whose_bytes_overflow(length, dtype):
    nbytes = length * torch.empty(0, dtype=dtype).element_size()

    def run():
        tensor = torch.zeros(1, dtype=dtype).expand(length)
        refused_put({"t": tensor}, "msg['t']", str(nbytes))
        refused(lambda: tensorslab.dumps([tensor]), "msg[0]", str(nbytes))

    in_fork(run)


def test_expanded_tensors_summing_past_the_address_space():
    def run():
        # Each is 2**62 bytes and fits alone; two do not.
        tensors = [torch.zeros(1).expand(2**60) for _ in range(3)]
        refused_put(tensors, "msg[1]")

    in_fork(run)


def test_empty_tensor_with_huge_strides_round_trips():
    # An empty tensor's strides address nothing, however large: it is sent, not refused.
    def run():
        tensor = torch.empty_strided((2, 0), (2**62, 1))
        tx, rx = tensorslab.channel()
        with tx, rx:
            tx.put(tensor, timeout=10)
            got = rx.get(timeout=10)
            assert got.shape == (2, 0) and got.dtype == torch.float32
        assert tensorslab.loads(tensorslab.dumps(tensor)).shape == (2, 0)

    in_fork(run)


def test_large_zero_stride_view_within_limits_round_trips():
    # A legitimate broadcast view is gathered into a C-contiguous payload.
    def run():
        view = np.broadcast_to(np.arange(3, dtype=np.int16)[::-1], (1 << 16, 3))
        tx, rx = tensorslab.channel()
        with tx, rx:
            tx.put([view, view.T], timeout=10)
            got = rx.get(timeout=10)
            assert np.array_equal(got[0], view) and np.array_equal(got[1], view.T)
            del got

    in_fork(run)


# ---- alloc ---------------------------------------------------------------------------------


@contextlib.contextmanager
def alloc_channel():
    """A channel that, once the body is done, holds what it held before and still works.
    (A context manager, not a fixture: pytest keeps fixture values alive past the leak
    check of the conftest.)"""
    tx, rx = tensorslab.channel(max_slab_bytes=64 * MiB)
    with tx, rx:
        tx.put("warm-up", timeout=10)
        assert rx.get(timeout=10) == "warm-up"
        before = occupancy(tx)
        yield tx, rx
        assert occupancy(tx) == before, "a failed alloc kept slab memory"
        still_works(tx, rx)


@pytest.mark.parametrize(
    ("shape", "dtype", "fragments"),
    [
        ((3, -1), np.uint8, ["shape[1]", "-1", "negative"]),
        (-5, np.uint8, ["shape[0]", "-5", "negative"]),
        ((2**64, 1), np.uint8, ["shape[0]", str(2**64)]),
        ((0, 2**63 + 5), np.uint8, ["shape[1]", str(2**63 + 5)]),
        ((2**62, 8), np.uint8, [str(2**65)]),
        ((2**31, 2**31, 2), np.float64, [str(2**66)]),
        ((2**62, 2**62, 0), np.uint8, ["(4611686018427387904, 4611686018427387904, 0)"]),
        ((0, 2**63 - 1), torch.float32, [str(4 * (2**63 - 1))]),
        ((2**61,), torch.float64, [str(2**64)]),
        ((1 << 30,), np.float32, ["max_slab_bytes", str(4 << 30)]),
    ],
)
def test_alloc_of_a_bad_shape_is_a_value_error(shape, dtype, fragments):
    with alloc_channel() as (tx, _):
        refused(lambda: tx.alloc(shape, dtype), *fragments)


@pytest.mark.parametrize("shape", [(2, "x"), 2.5, None, [[1]]])
def test_alloc_of_a_non_integer_shape_is_a_type_error(shape):
    with alloc_channel() as (tx, _), pytest.raises(TypeError, match="shape"):
        tx.alloc(shape, np.uint8)


@pytest.mark.parametrize("dtype", [np.float32, torch.float32])
def test_alloc_of_empty_and_ordinary_shapes(dtype):
    with alloc_channel() as (tx, rx):
        for shape in [(0,), (3, 0, 2**40), (4, 5), np.int64(7)]:
            buffer = tx.alloc(shape, dtype)
            expected = (int(shape),) if np.ndim(shape) == 0 else shape
            assert tuple(buffer.shape) == expected
            buffer[...] = 1
            tx.put(buffer, timeout=10)
            got = rx.get(timeout=10)
            assert tuple(got.shape) == expected and (np.asarray(got) == 1).all()
            del buffer, got


# ---- properties ----------------------------------------------------------------------------

# Dimensions from empty to far past any memory; products of a few of them overflow.
DIMS = st.sampled_from([0, 1, 2, 3, 5, 2**10, 2**20, 2**31, 2**40, 2**61, 2**62, 2**63 - 1])
SHAPES = st.lists(DIMS, max_size=4).map(tuple)


@st.composite
def numpy_views(draw):
    """A view of a small array: broadcast to a possibly huge shape (zero strides), its last
    axis reversed (negative strides), transposed; as a recipe the child rebuilds."""
    base_len = draw(st.sampled_from([1, 2, 3, 5]))
    dtype = draw(st.sampled_from(["u1", "<i4", ">f8", "c16"]))
    shape = draw(SHAPES)
    if shape and draw(st.booleans()):  # the last axis walks the base: a nonzero stride
        shape = shape[:-1] + (base_len,)
    reverse = draw(st.booleans())
    transpose = draw(st.booleans())
    return ("numpy", base_len, dtype, shape, reverse, transpose)


@st.composite
def torch_views(draw):
    """An expanded tensor: every dimension of the base is 1, each stride 0 after `expand`."""
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "complex128"]))
    return ("torch", dtype, draw(SHAPES))


def build(recipe):
    if recipe[0] == "numpy":
        _, base_len, dtype, shape, reverse, transpose = recipe
        base = np.arange(base_len).astype(dtype)
        source = base if shape[-1:] == (base_len,) else base[:1]
        try:
            view = np.broadcast_to(source, shape) if shape else source[0, ...]
        except ValueError:  # NumPy itself refuses shapes past isize::MAX bytes
            return None
        if reverse and view.ndim:
            view = view[..., ::-1]
        return view.T if transpose else view
    _, dtype, shape = recipe
    try:
        return torch.ones((1,) * len(shape), dtype=getattr(torch, dtype)).expand(shape)
    except RuntimeError:  # torch refuses shapes whose element count overflows int64
        return None


def nbytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    return value.size * value.itemsize


def extent(value) -> int:
    """Element size times the nonzero dimensions: what must fit in isize::MAX for the
    C-order strides of the shape to fit (NumPy's rule, which torch does not follow)."""
    itemsize = value.element_size() if isinstance(value, torch.Tensor) else value.itemsize
    return itemsize * int(np.prod([dim for dim in value.shape if dim], dtype=object))


def wrap(values, nesting):
    """`values` inside containers: a list, then `nesting` of dict / tuple levels."""
    value = list(values)
    for level in nesting:
        value = {"k": value} if level == "dict" else (value,)
    return value


def same(got, expected) -> bool:
    if isinstance(expected, torch.Tensor):
        return (
            isinstance(got, torch.Tensor)
            and got.dtype == expected.dtype
            and got.shape == expected.shape
            and torch.equal(got, expected)
        )
    return got.dtype == expected.dtype and np.array_equal(got, expected)


def unwrap(value, nesting):
    for level in reversed(nesting):
        value = value["k"] if level == "dict" else value[0]
    return value


# A message up to this size must arrive; past what the slab may map it must be refused.
ROUND_TRIP_LIMIT = 32 * MiB
SLAB_LIMIT = 64 * MiB


def check_message(recipes, nesting):
    """Puts (and dumps) the views: a correct round trip, or a clean ValueError that keeps
    nothing allocated. Runs in a forked child."""
    # NumPy and torch refuse some shapes themselves: those views are left out.
    values = [value for value in map(build, recipes) if value is not None]
    if not values:
        return "unbuildable"
    message = wrap(values, nesting)
    total = sum(nbytes(value) for value in values)
    unaddressable = total > ISIZE_MAX or any(extent(value) > ISIZE_MAX for value in values)
    tx, rx = tensorslab.channel(max_slab_bytes=SLAB_LIMIT)
    with tx, rx:
        before = occupancy(tx)
        if unaddressable:
            # Sizes the encoder checks name the path inside the message.
            with pytest.raises(ValueError, match="^msg"):
                tx.put(message, timeout=10)
            with pytest.raises(ValueError, match="^msg"):
                tensorslab.dumps(message)
            outcome = "refused"
        else:
            try:
                tx.put(message, timeout=10)
            except ValueError as error:
                # Only a message about as large as the slab may be refused, by the slab.
                assert total > ROUND_TRIP_LIMIT and "max_slab_bytes" in str(error), error
                outcome = "refused"
            else:
                got = unwrap(rx.get(timeout=10), nesting)
                assert all(same(g, e) for g, e in zip(got, values))
                del got
                if total <= ROUND_TRIP_LIMIT:
                    loaded = unwrap(tensorslab.loads(tensorslab.dumps(message)), nesting)
                    assert all(same(g, e) for g, e in zip(loaded, values))
                outcome = "sent"
        assert occupancy(tx) == before, "the put kept slab memory"
        still_works(tx, rx)
    return outcome


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    recipes=st.lists(numpy_views() | torch_views(), min_size=1, max_size=5),
    nesting=st.lists(st.sampled_from(["dict", "tuple"]), max_size=3),
)
def test_views_of_any_size_round_trip_or_are_refused(recipes, nesting):
    outcome = in_fork(check_message, recipes, nesting)
    assume(outcome != "unbuildable")
    event(outcome)
