"""`tensorslab.share`: tensors, modules and arrays in shared memory that stays shared.

Every cross-process behaviour runs in real children, under fork and spawn: in-place
updates are seen both ways; a module of 500 parameters takes one descriptor and one
mapping in a child; references travel as `Process` arguments, through `multiprocessing`
queues (whichever of tensorslab and torch.multiprocessing is imported first) and through
tensorslab queues; a holder killed with SIGKILL leaves nothing once the others drop it.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from multiprocessing.reduction import ForkingPickler

import numpy as np
import pytest
import torch

import share_children
import tensorslab
from helpers import Child
from tensorslab import _tensorslab

METHODS = ("fork", "spawn")
WAIT = 60


def segment_names(pid: int | None = None) -> set[str]:
    return {
        target.split("memfd:")[-1].split(" ")[0]
        for target in share_children.segment_descriptors(pid)
    }


def holders_anywhere(name: str) -> list[str]:
    """Every process of this user that still holds segment `name` open or mapped."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if any(name in target for target in share_children.segment_descriptors(int(pid))):
                found.append(f"pid {pid} (descriptor)")
            with open(f"/proc/{pid}/maps") as maps:
                if name in maps.read():
                    found.append(f"pid {pid} (mapping)")
        except OSError:
            continue  # exited meanwhile, or another user's
    return found


# --- in one process ----------------------------------------------------------------------


def test_share_moves_a_module_into_one_segment_in_place():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3))
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    weight = model[0].weight
    assert tensorslab.share(model) is model
    assert model[0].weight is weight, "the Parameter object must stay the same"
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
        assert tensor.data_ptr() % 64 == 0, f"{name} is not 64-byte aligned"
    assert len(segment_names()) == 1
    # Sharing again moves nothing: the tensors are in a shared segment already.
    tensorslab.share(model)
    assert len(segment_names()) == 1
    loss = model(torch.randn(4, 5)).sum()
    loss.backward()
    assert model[0].weight.grad is not None


def test_tied_weights_stay_tied():
    embedding = torch.nn.Embedding(7, 4)
    head = torch.nn.Linear(4, 7, bias=False)
    head.weight = embedding.weight
    model = torch.nn.ModuleList([embedding, head])
    tensorslab.share(model)
    assert model[0].weight.data_ptr() == model[1].weight.data_ptr()
    # Two parameters viewing one storage keep viewing one storage, at the same distance.
    whole = torch.arange(8.0)
    halves = torch.nn.ParameterList([whole[:4], whole[4:]])
    tensorslab.share(halves)
    assert halves[1].data_ptr() - halves[0].data_ptr() == 16
    assert halves[0].untyped_storage().data_ptr() == halves[1].untyped_storage().data_ptr()
    assert halves[1].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_share_array_returns_a_shared_copy():
    original = np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]
    shared = tensorslab.share(original)
    assert shared is not original
    np.testing.assert_array_equal(shared, original)
    assert shared.flags.writeable
    view = pickle.loads(ForkingPickler.dumps(shared[1:]))
    view[0, 0] = 100
    assert shared[1, 0] == 100


def test_a_reference_carries_no_data():
    tensor = tensorslab.share(torch.ones(1 << 18))  # 1 MiB
    assert len(ForkingPickler.dumps(tensor)) < 1024
    assert len(tensorslab.dumps(tensor)) < 1024
    back = tensorslab.loads(tensorslab.dumps({"t": tensor}), allow_pickle=True)["t"]
    assert back.data_ptr() == tensor.data_ptr(), "mapped a second time in the same process"
    tx, rx = tensorslab.channel()
    with tx, rx:
        tx.put({"t": tensor, "view": tensor[2:]})
        assert tx.stats()["bytes_sent"] < 1024, "the channel copied the tensor"
        got = rx.get(timeout=WAIT)
        assert got["view"].data_ptr() == tensor.data_ptr() + 8
        del got
    sending, receiving = mp.Pipe()
    with sending, receiving:
        sending.send(tensor[1:])
        assert receiving.poll(WAIT)
        assert receiving.recv().data_ptr() == tensor.data_ptr() + 4


def test_other_tensors_travel_as_before_while_a_segment_is_live():
    shared = tensorslab.share(torch.ones(3))
    sparse, plain, array = torch.eye(3).to_sparse(), torch.arange(4), np.arange(3)
    back = tensorslab.loads(tensorslab.dumps([sparse, plain, array]), allow_pickle=True)
    assert torch.equal(back[0].to_dense(), torch.eye(3))
    assert torch.equal(back[1], plain) and back[1].data_ptr() != plain.data_ptr()
    np.testing.assert_array_equal(back[2], array)
    del shared


def test_loads_without_allow_pickle_refuses_a_reference():
    data = tensorslab.dumps([tensorslab.share(torch.ones(3))])
    with pytest.raises(tensorslab.DecodeError, match="allow_pickle=True"):
        tensorslab.loads(data)


def test_no_holder_alive_is_a_clear_error():
    tensor = tensorslab.share(torch.ones(3))
    data = ForkingPickler.dumps(tensor)
    del tensor
    gc.collect()
    assert _tensorslab._share_live() == 0, "the segment outlived its last view"
    with pytest.raises(tensorslab.PeerGone, match="no process known to hold it"):
        pickle.loads(data)


class _FakeCudaTensor(torch.Tensor):
    """What share sees of a CUDA tensor, on a machine without a GPU."""

    @property
    def device(self):
        return torch.device("cuda", 0)


def test_cuda_tensor_is_a_type_error_naming_the_device():
    fake = torch.Tensor._make_subclass(_FakeCudaTensor, torch.zeros(2))
    with pytest.raises(TypeError, match=r"tensor is on cuda:0: tensorslab shares CPU memory"):
        tensorslab.share(fake)
    with pytest.raises(TypeError, match="on meta"):
        tensorslab.share(torch.empty(2, device="meta"))
    if torch.cuda.is_available():
        with pytest.raises(TypeError, match="cuda:0"):
            tensorslab.share(torch.zeros(2, device="cuda"))


def test_bad_input_is_a_specific_error():
    with pytest.raises(TypeError, match="takes a torch tensor .* not int"):
        tensorslab.share(3)
    with pytest.raises(TypeError, match="not list"):
        tensorslab.share([torch.ones(2)])
    with pytest.raises(TypeError, match=r"sparse tensor \(torch.sparse_coo\).*to_dense"):
        tensorslab.share(torch.eye(3).to_sparse())
    model = torch.nn.Linear(2, 2)
    model.register_buffer("mask", torch.eye(2).to_sparse())
    with pytest.raises(TypeError, match=r"share\(Linear\): buffer 'mask' is a sparse"):
        tensorslab.share(model)
    assert _tensorslab._share_live() == 0, "a refused share left a segment"
    with pytest.raises(TypeError, match="Python objects"):
        tensorslab.share(np.array([object()]))


def test_a_strict_channel_refusing_a_shared_tensor_names_the_tensor():
    tx, rx = tensorslab.channel(strict=True)
    shared = {"t": tensorslab.share(torch.ones(2)), "a": tensorslab.share(np.ones(2))}
    for key, kind in (("t", "torch.Tensor"), ("a", "numpy.ndarray")):
        with pytest.raises(tensorslab.EncodeError) as raised:
            tx.put({"batch": [shared[key]]})
        message = str(raised.value)
        assert message.startswith("msg['batch'][0]: "), message
        assert f"object of type {kind} without pickling (strict=True)" in message, message
    tx.close()
    rx.close()


# --- across processes --------------------------------------------------------------------


@pytest.mark.parametrize("method", [*METHODS, "forkserver"])
def test_in_place_updates_are_seen_both_ways(method):
    ctx = mp.get_context(method)
    model = tensorslab.share(torch.nn.Linear(3, 2))
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.fill_(1)
    done, go = ctx.Event(), ctx.Event()
    with Child(method, share_children.bump_and_wait, model, 2.0, done, go, 10.0) as child:
        assert done.wait(WAIT)
        assert all(bool((tensor == 3).all()) for tensor in model.parameters())
        with torch.no_grad():
            for tensor in model.parameters():
                tensor.fill_(10)
        go.set()
        assert child.join() is True, "the child did not see the parent's write"


@pytest.mark.parametrize("method", METHODS)
def test_five_hundred_parameters_take_one_descriptor_in_a_child(method):
    model = torch.nn.ParameterList(
        [torch.nn.Parameter(torch.full((3,), float(i))) for i in range(500)]
    )
    tensorslab.share(model)
    (name,) = segment_names()
    count, descriptors, mapped = (
        Child(method, share_children.count_descriptors, model).start().join()
    )
    assert count == 500
    assert descriptors == [f"/memfd:{name} (deleted)"], descriptors
    assert mapped == {name: 1}, f"the child mapped the segment {mapped} times"


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("queue", ["tensorslab", "multiprocessing"])
def test_a_queue_hands_over_the_same_memory(method, queue):
    ctx = mp.get_context(method)
    source = tensorslab.Queue() if queue == "tensorslab" else ctx.Queue()
    tensor = tensorslab.share(torch.zeros(4))
    done = ctx.Event()
    with Child(method, share_children.receive_and_bump, source, 5.0, done) as child:
        source.put(tensor)
        assert done.wait(WAIT)
        assert tensor.tolist() == [5.0] * 4, "the child's update did not reach the parent"
        assert child.join() == [5.0] * 4
    if queue == "multiprocessing":
        source.close()
        source.join_thread()


@pytest.mark.parametrize("method", METHODS)
def test_a_module_through_a_tensorslab_queue_stays_shared(method):
    # A module has no tensorslab encoding: it is pickled, and its shared parameters must
    # still travel as references inside that pickle.
    ctx = mp.get_context(method)
    model = tensorslab.share(torch.nn.Linear(2, 1))
    with torch.no_grad():
        for tensor in model.parameters():
            tensor.zero_()
    source, done = tensorslab.Queue(), ctx.Event()
    with Child(method, share_children.receive_module_and_bump, source, 1.0, done) as child:
        source.put(model)
        assert done.wait(WAIT)
        assert [t.tolist() for t in model.parameters()] == [[[1.0, 1.0]], [1.0]]
        child.join()


@pytest.mark.parametrize("torch_first", [True, False], ids=["torch-mp-first", "tensorslab-first"])
def test_either_import_order_of_torch_multiprocessing(torch_first, tmp_path):
    """A fresh interpreter imports the two in a given order, then sends a shared tensor and
    a plain one to a spawn child through a multiprocessing queue. The shared one must come
    back as a reference to our segment; the plain one as torch.multiprocessing sends it
    (it moves the tensor into its own shared memory, so the child's write shows too).

    `import torch` imports torch.multiprocessing, so torch's reducers are registered before
    any `share`; the tensorslab-first script also registers them again after `share`, as
    a later `init_reductions()` would."""
    imports = ["import torch.multiprocessing", "import tensorslab"]
    script = tmp_path / "import_order.py"
    first = f"TENSORSLAB_FIRST = {not torch_first}"
    script.write_text("\n".join([first, *(imports if torch_first else imports[::-1]), SCRIPT]))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=os.path.dirname(__file__),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == ["shared", "[1.0,", "1.0]", "plain", "[2.0,", "2.0]"]


SCRIPT = textwrap.dedent(
    """
    import multiprocessing as mp
    import torch
    import tensorslab
    from tensorslab.testing import leaked_segments

    def child(q, done):
        shared, plain = q.get(timeout=60)
        with torch.no_grad():
            shared.add_(1)
            plain.add_(2)
        done.put(tensorslab._tensorslab._share_live())

    if __name__ == "__main__":
        ctx = mp.get_context("spawn")
        q, done = ctx.Queue(), ctx.Queue()
        shared, plain = tensorslab.share(torch.zeros(2)), torch.zeros(2)
        if TENSORSLAB_FIRST:
            torch.multiprocessing.reductions.init_reductions()
        p = ctx.Process(target=child, args=(q, done))
        p.start()
        q.put((shared, plain))
        assert done.get(timeout=60) == 1, "the child did not attach our segment"
        p.join(60)
        assert p.exitcode == 0, p.exitcode
        print("shared", shared.tolist(), "plain", plain.tolist())
        del shared
        import gc; gc.collect()
        assert not leaked_segments(), leaked_segments()
    """
)


def test_a_fork_child_names_the_process_it_inherited_the_segment_from():
    # A fork child holds the parent's descriptor without attaching: its references must
    # name the parent too, or a tensor it sends is lost once it exits (the parent holds it).
    tensor = tensorslab.share(torch.arange(3, dtype=torch.float64))
    data = Child("fork", share_children.pickle_for_later, tensor).start().join()
    with Child("spawn", share_children.unpickle_and_bump, data, 1.0) as child:
        assert child.join() == [1.0, 2.0, 3.0]
    assert tensor.tolist() == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("method", METHODS)
def test_a_killed_holder_leaves_nothing_once_the_others_drop_it(method):
    ctx = mp.get_context(method)
    # The creator of the segment is the one killed: the parent, which attached it, keeps
    # the memory and can still hand it on (as the holder a new reference names).
    out, release = ctx.Queue(), ctx.Event()
    creator = Child(method, share_children.create_and_send, out, release).start()
    tensor = out.get(timeout=WAIT)
    (name,) = segment_names()
    ready = ctx.Event()
    holder = Child(method, share_children.hold_until_killed, tensor, ready).start()
    assert ready.wait(WAIT)
    os.kill(creator.pid, signal.SIGKILL)
    os.kill(holder.pid, signal.SIGKILL)
    creator.join(expect_exitcode=-signal.SIGKILL)
    holder.join(expect_exitcode=-signal.SIGKILL)
    assert tensor.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    done, later = ctx.Event(), tensorslab.Queue()
    with Child(method, share_children.receive_and_bump, later, 1.0, done) as child:
        later.put(tensor)
        assert done.wait(WAIT)
        assert child.join() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert holders_anywhere(name) == [
        f"pid {os.getpid()} (descriptor)",
        f"pid {os.getpid()} (mapping)",
    ]
    del tensor, holder  # the holder's Process keeps its arguments
    gc.collect()
    assert holders_anywhere(name) == [], "the segment outlived every process that held it"
    out.close()
    out.join_thread()
