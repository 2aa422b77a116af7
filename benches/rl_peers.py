"""The contenders of ``rl.py``, each a small picklable class, and the actor processes' loops.

Weight broadcast: the learner (the parent process) owns one ``WeightPeer`` per contender; each
actor process gets the end ``actor_end(i)`` returns, holding only what that actor needs for
every phase (a phase is one actor count: 1, 2 or 4). An actor runs ``weight_actor``: it builds
its own module, then for each phase the driver starts it waits for ``rounds`` new versions,
loads each one into its module and acknowledges it through its own pipe (the same side channel
for every contender).

Rollout streaming: ``RolloutPeer.sender()`` is pickled into every actor process, which runs
``rollout_actor``: step a :class:`FakeEnv`, write each step into the rollout the sender made,
send it. The learner (the parent) takes rollouts with ``recv`` and touches them.

Everything tensorslab does is in :class:`Latest`, :class:`Broadcast` and :class:`ChunkSender`.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import numpy as np
from payloads import touch

POLL_S = 0.0005  # how often a shared-parameters actor looks at the version counter
STOP, DRAINED = 1, 2  # rollout stop flag: the learner stops the actors, then lets them go
REUSED_BUFFERS = 4  # the reference's buffers per actor, taken in turn: far more than any cache


# ---------------------------------------------------------------------------------------------
# The model whose weights travel.


def model_shapes(width: int, blocks: int) -> list[tuple[int, int]]:
    """``(in, out)`` of each Linear: ``blocks`` MLP blocks ``width -> 4*width -> width``."""
    return [(width, 4 * width), (4 * width, width)] * blocks


def build_model(width: int, blocks: int) -> Any:
    import torch

    layers = [torch.nn.Linear(i, o) for i, o in model_shapes(width, blocks)]
    return torch.nn.Sequential(*layers)


def model_nbytes(width: int, blocks: int) -> int:
    return sum((i * o + o) * 4 for i, o in model_shapes(width, blocks))


def fill_weights(model: Any, value: float) -> None:
    """The learner's new version: every parameter set to ``value``, so an actor can tell from
    its first and last element that it loaded one whole version."""
    import torch

    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)


def copy_into(targets: dict[str, Any], state: dict[str, Any]) -> None:
    """Copies ``state`` into the actor's own tensors (what ``load_state_dict`` does, minus its
    checks): the load for every contender but ``latest()``, whose ``load_into`` does it."""
    import torch

    with torch.no_grad():
        for name, tensor in targets.items():
            tensor.copy_(state[name])


# ---------------------------------------------------------------------------------------------
# Weight broadcast: the learner's side.


class WeightPeer:
    name = ""
    description = ""

    def open(self, ctx: Any, counts: list[int], model: Any) -> None:
        """Endpoints for every phase (``counts[phase]`` actors), before the actors start."""
        raise NotImplementedError

    def actor_end(self, actor: int) -> Any:
        """What actor ``actor`` needs, for every phase it takes part in (picklable)."""
        raise NotImplementedError

    def close_parent_copies(self) -> None:
        """The parent's copies of what it handed to the actors, once they have started."""

    def update(self, model: Any, value: float) -> None:
        """The learner's training step, in place on its module."""
        fill_weights(model, value)

    def send(self, phase: int, model: Any, timeout: float) -> None:
        """Hands the module's new weights to the actors of ``phase``."""
        raise NotImplementedError

    def stats(self, phase: int) -> dict | None:
        return None

    def end_phase(self, phase: int) -> None:
        """Lets go of what only ``phase`` used, once its actors acknowledged its last round."""

    def close(self) -> None:
        pass


def slab_figures(stats: dict) -> dict:
    return {key: stats[key] for key in ("slab_mapped_bytes", "slab_used_bytes", "segments")}


class Latest(WeightPeer):
    name = "tensorslab latest()"
    description = "writer.publish(model.state_dict()); actors reader.load_into(model)"

    def open(self, ctx: Any, counts: list[int], model: Any) -> None:
        import tensorslab

        self.counts = counts
        self.mailboxes = [tensorslab.latest() for _ in counts]

    def actor_end(self, actor: int) -> LatestEnd:
        readers = {p: r for p, (_, r) in enumerate(self.mailboxes) if actor < self.counts[p]}
        return LatestEnd(readers)

    def close_parent_copies(self) -> None:
        for _, reader in self.mailboxes:
            reader.close()

    def send(self, phase: int, model: Any, timeout: float) -> None:
        self.mailboxes[phase][0].publish(model.state_dict(), timeout=timeout)

    def stats(self, phase: int) -> dict | None:
        return slab_figures(self.mailboxes[phase][0].stats())

    def end_phase(self, phase: int) -> None:
        self.mailboxes[phase][0].close()
        self.mailboxes[phase] = None  # a closed handle keeps its segments mapped until dropped

    def close(self) -> None:
        for mailbox in self.mailboxes:
            for handle in mailbox or ():
                if not handle.closed:
                    handle.close()
        self.mailboxes = []


class LatestEnd:
    def __init__(self, readers: dict[int, Any]) -> None:
        self.readers = readers
        self.seen = 0

    def begin(self, phase: int) -> None:
        self.seen = self.readers[phase].version

    def load(self, phase: int, model: Any, targets: dict[str, Any], timeout: float) -> None:
        self.seen = self.readers[phase].load_into(model, newer_than=self.seen, timeout=timeout)

    def end_phase(self, phase: int) -> None:
        self.readers.pop(phase).close()

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


class Broadcast(WeightPeer):
    name = "tensorslab broadcast()"
    description = "pub.put(model.state_dict()); actors sub.get(), then copy into their module"

    def open(self, ctx: Any, counts: list[int], model: Any) -> None:
        import tensorslab

        self.counts = counts
        self.publishers, self.subscribers = [], []
        for count in counts:
            publisher, first = tensorslab.broadcast(depth=2)
            self.publishers.append(publisher)
            self.subscribers.append([first] + [publisher.subscribe() for _ in range(count - 1)])

    def actor_end(self, actor: int) -> BroadcastEnd:
        return BroadcastEnd(
            {p: subs[actor] for p, subs in enumerate(self.subscribers) if actor < len(subs)}
        )

    def close_parent_copies(self) -> None:
        for subscribers in self.subscribers:
            for subscriber in subscribers:
                subscriber.close()
        self.subscribers = []  # dropped: a closed handle keeps its segments mapped

    def send(self, phase: int, model: Any, timeout: float) -> None:
        self.publishers[phase].put(model.state_dict(), timeout=timeout)

    def stats(self, phase: int) -> dict | None:
        return slab_figures(self.publishers[phase].stats())

    def end_phase(self, phase: int) -> None:
        self.publishers[phase].close()
        self.publishers[phase] = None

    def close(self) -> None:
        for handle in [*self.publishers, *(s for subs in self.subscribers for s in subs)]:
            if handle is not None and not handle.closed:
                handle.close()
        self.publishers, self.subscribers = [], []


class BroadcastEnd:
    def __init__(self, subscribers: dict[int, Any]) -> None:
        self.subscribers = subscribers

    def begin(self, phase: int) -> None:
        pass

    def load(self, phase: int, model: Any, targets: dict[str, Any], timeout: float) -> None:
        state = self.subscribers[phase].get(timeout=timeout)
        copy_into(targets, state)
        del state  # the views go, so the message's block can return to the slab

    def end_phase(self, phase: int) -> None:
        self.subscribers.pop(phase).close()

    def close(self) -> None:
        for subscriber in self.subscribers.values():
            subscriber.close()


class MpQueuePerActor(WeightPeer):
    """One ``multiprocessing.Queue`` per actor. The learner puts NumPy views of its weights
    (importing torch made ``multiprocessing`` pickle tensors through torch's shared memory; a
    NumPy array is pickled by value), so each queue pickles the whole state dict once more."""

    name = "mp.Queue per actor"
    description = "one multiprocessing.Queue per actor; the learner puts the state dict to each"
    numpy = True

    def open(self, ctx: Any, counts: list[int], model: Any) -> None:
        self.counts = counts
        self.queues = [self._context(ctx).Queue() for _ in range(max(counts))]
        self.last: dict | None = None

    def _context(self, ctx: Any) -> Any:
        return ctx

    def actor_end(self, actor: int) -> QueueEnd:
        return QueueEnd(self.queues[actor], self.numpy)

    def message(self, model: Any) -> dict:
        return {name: tensor.numpy() for name, tensor in model.state_dict().items()}

    def send(self, phase: int, model: Any, timeout: float) -> None:
        # Kept until the next round: the queue's feeder thread pickles it after put returns.
        self.last = self.message(model)
        for q in self.queues[: self.counts[phase]]:
            q.put(self.last, timeout=timeout)

    def end_phase(self, phase: int) -> None:
        self.last = None

    def close(self) -> None:
        for q in self.queues:
            q.close()
            # After a failed round a message may sit unsent for an actor that is gone: waiting
            # for the feeder to flush it would never end. After a good run nothing is left.
            q.cancel_join_thread()


class TorchQueuePerActor(MpQueuePerActor):
    """One ``torch.multiprocessing.Queue`` per actor (sharing strategy ``file_descriptor``).
    Each round's tensors get a fresh storage over the learner's weights
    (``torch.from_numpy(t.numpy())``, no copy), as weights copied off a GPU would have: torch
    then copies each one into a new shared segment once, at the first put, and the other
    queues send handles to the same segment. (Putting the live parameters would share them in
    place: actors would read weights the learner is changing.)"""

    name = "torch.mp.Queue per actor"
    description = (
        "one torch.multiprocessing.Queue per actor; tensors moved to shared memory once per round"
    )
    numpy = False

    def _context(self, ctx: Any) -> Any:
        import torch.multiprocessing

        return torch.multiprocessing.get_context("spawn")

    def message(self, model: Any) -> dict:
        import torch

        return {k: torch.from_numpy(t.numpy()) for k, t in model.state_dict().items()}


class QueueEnd:
    def __init__(self, q: Any, numpy: bool) -> None:
        self.q, self.numpy = q, numpy

    def begin(self, phase: int) -> None:
        pass

    def load(self, phase: int, model: Any, targets: dict[str, Any], timeout: float) -> None:
        import torch

        state = self.q.get(timeout=timeout)
        if self.numpy:
            state = {name: torch.from_numpy(array) for name, array in state.items()}
        copy_into(targets, state)

    def end_phase(self, phase: int) -> None:
        pass

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class SharedUnderLock(WeightPeer):
    """The sample-factory pattern: the learner's parameters live in shared memory
    (``share_memory_()``) and its update runs in place under a cross-process lock, then bumps
    a shared version counter; each actor polls the counter and copies the weights under the
    same lock (so loads are never torn, and actors load one at a time)."""

    name = "shared params + lock"
    description = (
        "sample-factory: share_memory_() parameters updated in place under an mp.Lock, a shared "
        f"version counter; actors poll it every {POLL_S * 1e3:g} ms and copy under the lock"
    )

    def open(self, ctx: Any, counts: list[int], model: Any) -> None:
        model.share_memory()
        self.shared = dict(model.state_dict())
        self.lock = ctx.Lock()
        self.version = ctx.RawValue("q", 0)

    def actor_end(self, actor: int) -> SharedEnd:
        return SharedEnd(self.shared, self.lock, self.version)

    def update(self, model: Any, value: float) -> None:
        with self.lock:
            fill_weights(model, value)
            self.version.value += 1

    def send(self, phase: int, model: Any, timeout: float) -> None:
        pass  # the update itself published the weights


class SharedEnd:
    def __init__(self, shared: dict[str, Any], lock: Any, version: Any) -> None:
        self.shared, self.lock, self.version = shared, lock, version
        self.seen = 0

    def begin(self, phase: int) -> None:
        self.seen = self.version.value

    def load(self, phase: int, model: Any, targets: dict[str, Any], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.version.value <= self.seen:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no version after {self.seen} within {timeout:.0f} s")
            time.sleep(POLL_S)
        with self.lock:
            copy_into(targets, self.shared)
            self.seen = self.version.value

    def end_phase(self, phase: int) -> None:
        pass

    def close(self) -> None:
        pass


WEIGHT_PEERS = [Latest, Broadcast, MpQueuePerActor, TorchQueuePerActor, SharedUnderLock]


def weight_actor(
    report: Any, end: Any, conn: Any, width: int, blocks: int, rounds: int, timeout: float
) -> None:
    """An actor: its own module; per phase, ``rounds`` versions loaded and acknowledged."""
    import torch

    torch.set_num_threads(1)
    model = build_model(width, blocks)
    targets = dict(model.state_dict(keep_vars=True))
    tensors = [tensor.detach() for tensor in targets.values()]
    first_tensor, last_tensor = tensors[0], tensors[-1]
    conn.send(("ready", None, 0.0))
    while True:
        command = conn.recv()  # EOFError if the driver is gone: this actor ends with it
        if command[0] == "exit":
            break
        phase = command[1]
        end.begin(phase)
        conn.send(("ready", phase, 0.0))
        for _ in range(rounds):
            end.load(phase, model, targets, timeout)
            first, last = float(first_tensor.view(-1)[0]), float(last_tensor.view(-1)[-1])
            if first != last:
                raise RuntimeError(f"phase {phase}: loaded a mixed version ({first} and {last})")
            conn.send(("loaded", phase, first))
        end.end_phase(phase)
    end.close()
    conn.close()


# ---------------------------------------------------------------------------------------------
# Rollout streaming.


class FakeEnv:
    """``envs`` environments whose step costs nothing but handing back a large observation:
    one of a few ready-made frames, a reward and a done flag. The transport is what is left."""

    def __init__(self, envs: int, obs_shape: tuple[int, ...], dtype: str, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.frames = [
            rng.integers(0, 255, (envs, *obs_shape), dtype=np.uint8).astype(dtype) for _ in range(4)
        ]
        self.rewards = rng.random((16, envs), dtype=np.float32)
        self.dones = rng.random((16, envs)) < 0.01
        self.t = 0

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.t += 1
        k = self.t % 16
        return self.frames[self.t % len(self.frames)], self.rewards[k], self.dones[k]


def rollout_spec(steps: int, envs: int, obs_shape: tuple[int, ...], dtype: str) -> dict:
    """The rollout's arrays: ``name: (shape, NumPy dtype name)``."""
    return {
        "obs": ((steps, envs, *obs_shape), dtype),
        "act": ((steps, envs), "int64"),
        "rew": ((steps, envs), "float32"),
        "done": ((steps, envs), "bool"),
    }


def rollout_nbytes(spec: dict) -> int:
    return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in spec.values())


def torch_spec(spec: dict) -> dict:
    import torch

    return {name: (shape, getattr(torch, dtype)) for name, (shape, dtype) in spec.items()}


class RolloutPeer:
    name = ""
    description = ""

    def open(self, ctx: Any, capacity: int) -> None:
        raise NotImplementedError

    def sender(self) -> Any:
        """What every actor gets (picklable): ``new_rollout``, ``send``, ``close``."""
        raise NotImplementedError

    def close_parent_copies(self) -> None:
        pass

    def recv(self, timeout: float) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Chunks(RolloutPeer):
    name = "tensorslab chunks"
    description = (
        "tx.alloc(rollout structure) filled step by step in the slab, tx.put with no copy; "
        "the learner gets zero-copy views"
    )

    def open(self, ctx: Any, capacity: int) -> None:
        import tensorslab

        self.tx, self.rx = tensorslab.channel(capacity=capacity)

    def sender(self) -> ChunkSender:
        return ChunkSender(self.tx)

    def close_parent_copies(self) -> None:
        self.tx.close()

    def recv(self, timeout: float) -> Any:
        return self.rx.get(timeout=timeout)  # tensorslab.Empty is a queue.Empty

    def stats(self) -> dict:
        return slab_figures(self.rx.stats())

    def close(self) -> None:
        for handle in (self.tx, self.rx):
            if not handle.closed:
                handle.close()


class ChunkSender:
    def __init__(self, tx: Any) -> None:
        self.tx = tx

    def new_rollout(self, spec: dict) -> Any:
        return self.tx.alloc(torch_spec(spec))  # the whole structure in one slab block

    def send(self, msg: Any, timeout: float) -> None:
        self.tx.put(msg, timeout=timeout)  # tensorslab.Full is a queue.Full

    def close(self) -> None:
        self.tx.close()


class QueueRollouts(RolloutPeer):
    """One queue shared by the actors; each rollout is built in fresh arrays (NumPy for
    ``mp.Queue``, which pickles them by value) and put."""

    name = "mp.Queue"
    description = "multiprocessing.Queue; the actor fills fresh NumPy arrays and puts them"
    form = "numpy"

    def open(self, ctx: Any, capacity: int) -> None:
        self.q = self._context(ctx).Queue(maxsize=capacity)

    def _context(self, ctx: Any) -> Any:
        return ctx

    def sender(self) -> QueueSender:
        return QueueSender(self.q, self.form)

    def recv(self, timeout: float) -> Any:
        return self.q.get(timeout=timeout)

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


class TorchQueueRollouts(QueueRollouts):
    name = "torch.mp.Queue"
    description = (
        "torch.multiprocessing.Queue (file_descriptor strategy); the actor fills fresh tensors "
        "and puts them (torch moves each into a new shared segment)"
    )
    form = "torch"

    def _context(self, ctx: Any) -> Any:
        import torch.multiprocessing

        return torch.multiprocessing.get_context("spawn")


class NoTransport(QueueRollouts):
    """The ceiling: the actors' loop with nothing sent. Each actor fills a few buffers in turn
    (together far larger than any cache, as the slab's blocks are: one reused buffer would
    stay warm), touches each itself (the learner's work) and sends a token."""

    name = "reference: no transport"
    description = "the env loop into reused buffers, touched by the actor; tokens only"
    form = "reused"


class QueueSender:
    def __init__(self, q: Any, form: str) -> None:
        self.q, self.form = q, form
        self.reused: list[dict] = []
        self.sent = 0

    def new_rollout(self, spec: dict) -> dict:
        if self.form == "numpy":
            return {name: np.empty(shape, dtype) for name, (shape, dtype) in spec.items()}
        import torch

        if self.form == "torch":
            spec_items = torch_spec(spec).items()
            return {name: torch.empty(shape, dtype=d) for name, (shape, d) in spec_items}
        if not self.reused:
            self.reused = [
                {name: np.zeros(shape, dtype) for name, (shape, dtype) in spec.items()}
                for _ in range(REUSED_BUFFERS)
            ]
        self.sent += 1
        return self.reused[self.sent % REUSED_BUFFERS]

    def send(self, msg: Any, timeout: float) -> None:
        if self.form == "reused" and msg is not None:
            touch(msg["rollout"])
            msg = {**msg, "rollout": None}
        self.q.put(msg, timeout=timeout)

    def close(self) -> None:
        self.q.close()
        self.q.join_thread()


ROLLOUT_PEERS = [Chunks, TorchQueueRollouts, QueueRollouts, NoTransport]


def as_numpy(array: Any) -> np.ndarray:
    return array if isinstance(array, np.ndarray) else array.numpy()


def rollout_actor(
    report: Any, sender: Any, actor: int, spec: dict, stop: Any, timeout: float
) -> None:
    """Steps the env into rollouts and sends them until the learner raises ``stop``; then
    sends ``None`` and stays until the learner drained (torch's file_descriptor strategy
    fetches each tensor's descriptor from this process when the learner unpickles it)."""
    import torch

    torch.set_num_threads(1)
    steps, envs = spec["act"][0]
    obs_shape, obs_dtype = spec["obs"][0][2:], spec["obs"][1]
    env = FakeEnv(envs, obs_shape, obs_dtype, seed=actor)
    actions = np.random.default_rng(actor).integers(0, 18, (steps, envs), dtype=np.int64)
    index = 0
    while not stop.value:
        rollout = sender.new_rollout(spec)
        views = {name: as_numpy(array) for name, array in rollout.items()}
        for t in range(steps):
            obs, reward, done = env.step(actions[t])
            views["obs"][t] = obs
            views["act"][t] = actions[t]
            views["rew"][t] = reward
            views["done"][t] = done
        del views
        msg = {"rollout": rollout, "actor": actor, "index": index, "version": 0}
        del rollout
        while not stop.value:
            try:
                sender.send(msg, 0.2)
                break
            except queue.Full:
                continue
        del msg
        index += 1
    sender.send(None, timeout)
    report.put(("sent", f"actor{actor}", index))
    deadline = time.monotonic() + timeout
    while stop.value != DRAINED:
        if time.monotonic() > deadline:
            raise TimeoutError("the learner did not finish draining")
        time.sleep(0.005)
    sender.close()
