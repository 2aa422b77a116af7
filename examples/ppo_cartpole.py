"""PPO on CartPole-v1: actor processes feed a learner through tensorslab (issue 11).

    python examples/ppo_cartpole.py            # until the mean return reaches 450 (or 5 min)
    python examples/ppo_cartpole.py --smoke    # a few iterations: the pipeline works (CI)

Each actor steps a gymnasium vector environment with its own copy of the policy, fills a
rollout chunk in slab memory (``tx.alloc`` of the whole structure, one block) step by step
and puts it with no copy, tagged with the policy version it was collected with. The learner
runs PPO on the rollouts and publishes its weights through a latest-value mailbox; between
rollouts an actor copies the newest weights straight from shared memory into its module
(``reader.load_into``). The policy lag of a rollout is how many versions the learner is past
the one that collected it; PPO's clipped ratio (new policy over the policy that acted)
tolerates the lag of one or two versions this layout produces.

gymnasium is needed for this example only: ``pip install gymnasium``.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass

import gymnasium as gym
import numpy as np
import torch
from torch import nn

import tensorslab

OBS_SIZE, ACTIONS = 4, 2  # CartPole-v1: cart position/velocity, pole angle/velocity; left/right
SOLVED = 450.0  # the mean episode return a full run must reach (episodes end at 500)


@dataclass
class Config:
    actors: int = 2
    envs: int = 8  # environments per actor
    steps: int = 128  # steps per rollout (per environment)
    epochs: int = 4
    minibatches: int = 4
    lr: float = 1e-3
    gamma: float = 0.99
    gae_lambda: float = 0.95
    clip: float = 0.2
    value_coef: float = 0.5
    entropy_coef: float = 0.01
    max_grad_norm: float = 0.5
    time_limit: float = 300.0
    max_iterations: int | None = None
    window: int = 20  # the mean return is over this many most recent completed episodes
    seed: int = 0


# --- the policy and PPO ------------------------------------------------------------------


class Policy(nn.Module):
    """Separate actor and critic MLPs (a shared trunk makes the value loss fight the policy)."""

    def __init__(self) -> None:
        super().__init__()

        def mlp(out: int, gain: float) -> nn.Sequential:
            layers = [nn.Linear(OBS_SIZE, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh()]
            net = nn.Sequential(*layers, nn.Linear(64, out))
            for layer in net:
                if isinstance(layer, nn.Linear):
                    nn.init.orthogonal_(layer.weight, np.sqrt(2) if layer is not net[-1] else gain)
                    nn.init.zeros_(layer.bias)
            return net

        # A small last layer keeps the first policy near uniform and the first values near 0.
        self.actor = mlp(ACTIONS, 0.01)
        self.critic = mlp(1, 1.0)

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.critic(obs).squeeze(-1)

    @torch.no_grad()
    def act(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sampled actions and their log-probabilities under this policy."""
        log_probs = torch.log_softmax(self.actor(obs), dim=-1)
        actions = torch.multinomial(log_probs.exp(), 1).squeeze(-1)
        return actions, log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def evaluate(self, obs: torch.Tensor, actions: torch.Tensor):
        log_probs = torch.log_softmax(self.actor(obs), dim=-1)
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1), entropy, self.value(obs)


def rollout_spec(cfg: Config) -> dict:
    """The structure of one rollout chunk: (shape, dtype) of each field."""
    t, n = cfg.steps, cfg.envs
    return {
        "obs": ((t, n, OBS_SIZE), torch.float32),  # the observation acted on at step t
        "act": ((t, n), torch.int64),
        "logp": ((t, n), torch.float32),  # log-probability of the action under the actor's policy
        "rew": ((t, n), torch.float32),
        "terminated": ((t, n), torch.float32),  # 1: the pole fell; no value after this step
        "truncated": ((t, n), torch.float32),  # 1: the 500-step limit; bootstrap on final_obs
        "final_obs": ((t, n, OBS_SIZE), torch.float32),  # where a truncated episode stopped
        "next_obs": ((n, OBS_SIZE), torch.float32),  # the observation after the last step
    }


def make_env(cfg: Config) -> gym.vector.VectorEnv:
    # SAME_STEP autoreset: the step that ends an episode returns the next episode's first
    # observation and puts the last one in info["final_obs"], so every step is a real one.
    return gym.vector.SyncVectorEnv(
        [lambda: gym.make("CartPole-v1") for _ in range(cfg.envs)],
        autoreset_mode=gym.vector.AutoresetMode.SAME_STEP,
    )


class Collector:
    """Steps one vector environment with a policy and fills rollout chunks."""

    def __init__(self, cfg: Config, seed: int) -> None:
        self.env = make_env(cfg)
        obs, _ = self.env.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        self.episode_return = np.zeros(cfg.envs)
        self.steps = cfg.steps

    def collect(self, policy: Policy, chunk: dict) -> list[float]:
        """Fills `chunk` in place; returns the returns of the episodes that ended in it."""
        finished = []
        chunk["final_obs"].zero_()
        for t in range(self.steps):
            actions, logp = policy.act(self.obs)
            chunk["obs"][t] = self.obs
            chunk["act"][t] = actions
            chunk["logp"][t] = logp
            obs, reward, terminated, truncated, info = self.env.step(actions.numpy())
            chunk["rew"][t] = torch.from_numpy(reward)
            chunk["terminated"][t] = torch.from_numpy(terminated)
            chunk["truncated"][t] = torch.from_numpy(truncated)
            if truncated.any():
                for i in np.flatnonzero(truncated):
                    chunk["final_obs"][t, i] = torch.from_numpy(info["final_obs"][i])
            self.episode_return += reward
            for i in np.flatnonzero(terminated | truncated):
                finished.append(float(self.episode_return[i]))
                self.episode_return[i] = 0.0
            self.obs = torch.as_tensor(obs, dtype=torch.float32)
        chunk["next_obs"][:] = self.obs
        return finished

    def close(self) -> None:
        self.env.close()


def advantages(policy: Policy, batch: dict, cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(lambda) with the learner's current critic; returns (advantages, value targets).

    The critic is the learner's, not the one the actor held: a lagging rollout is valued by
    the newest estimate, and no values need to travel with it.
    """
    with torch.no_grad():
        values = policy.value(batch["obs"])
        next_value = policy.value(batch["next_obs"])
        final_values = policy.value(batch["final_obs"])
    terminated, truncated = batch["terminated"], batch["truncated"]
    steps = values.shape[0]
    adv = torch.zeros_like(values)
    last = torch.zeros_like(next_value)
    for t in reversed(range(steps)):
        following = next_value if t == steps - 1 else values[t + 1]
        # After a truncation the following row is a new episode: bootstrap on where the
        # old one stopped instead; after a termination there is nothing to bootstrap.
        following = torch.where(truncated[t] > 0, final_values[t], following)
        following = following * (1.0 - terminated[t])
        delta = batch["rew"][t] + cfg.gamma * following - values[t]
        carry = 1.0 - torch.maximum(terminated[t], truncated[t])
        last = delta + cfg.gamma * cfg.gae_lambda * carry * last
        adv[t] = last
    return adv, adv + values


def ppo_update(policy: Policy, optimizer: torch.optim.Optimizer, batch: dict, cfg: Config):
    """A few epochs of clipped PPO over minibatches of `batch` (time x envs); loss figures."""
    adv, returns = advantages(policy, batch, cfg)
    obs = batch["obs"].reshape(-1, OBS_SIZE)
    act, old_logp = batch["act"].reshape(-1), batch["logp"].reshape(-1)
    adv, returns = adv.reshape(-1), returns.reshape(-1)
    size = obs.shape[0]
    minibatch = size // cfg.minibatches
    clipped = []
    for _ in range(cfg.epochs):
        order = torch.randperm(size)
        for start in range(0, size - minibatch + 1, minibatch):
            idx = order[start : start + minibatch]
            logp, entropy, value = policy.evaluate(obs[idx], act[idx])
            mb_adv = adv[idx]
            mb_adv = (mb_adv - mb_adv.mean()) / (mb_adv.std() + 1e-8)
            ratio = (logp - old_logp[idx]).exp()
            policy_loss = -torch.min(
                ratio * mb_adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * mb_adv
            ).mean()
            value_loss = 0.5 * (value - returns[idx]).pow(2).mean()
            loss = policy_loss + cfg.value_coef * value_loss - cfg.entropy_coef * entropy.mean()
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(policy.parameters(), cfg.max_grad_norm)
            optimizer.step()
            clipped.append(float(((ratio - 1).abs() > cfg.clip).float().mean()))
    return {"clip_fraction": float(np.mean(clipped))}


# --- tensorslab: the channel and the mailbox, and an actor's use of them ----------------


def open_transport(cfg: Config):
    """The rollout channel and the weights mailbox.

    A channel of one slot per actor bounds how far the actors run ahead of the learner, and
    so the policy lag: while the learner updates, the next rollouts wait in the channel and
    the actors collect the ones after them with the weights they have (a lag of about 2).
    """
    tx, rx = tensorslab.channel(capacity=cfg.actors)
    writer, reader = tensorslab.latest()
    return tx, rx, writer, reader


def alloc_rollout(tx: tensorslab.Sender, spec: dict) -> dict:
    """A rollout chunk: every field of `spec` in one slab block, filled in place and put
    with no copy. A fresh one per rollout: the blocks the learner released are reused."""
    return tx.alloc(spec)


def put_rollout(tx: tensorslab.Sender, message: dict, stop) -> bool:
    """Puts `message`, giving up once `stop` is set (the learner may not read it any more)."""
    while not stop.is_set():
        try:
            tx.put(message, timeout=0.2)
            return True
        except tensorslab.Full:
            continue
    return False


def newest_weights(reader: tensorslab.Reader, policy: Policy, version: int) -> int:
    """Copies the newest weights into `policy` if there are newer than `version`."""
    if reader.version > version:
        # The version loaded, which may be newer still than the one just read.
        return reader.load_into(policy)
    return version


# --- the actors ----------------------------------------------------------------------------


def actor(index: int, cfg: Config, tx, reader, stop) -> None:
    """Collects rollouts with the newest weights until `stop` is set or the learner left."""
    # Ctrl-C reaches the whole process group: the learner alone handles it, by setting stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    seed = cfg.seed + 1000 * (index + 1)
    torch.manual_seed(seed)
    policy = Policy()
    collector = Collector(cfg, seed)
    spec = rollout_spec(cfg)
    try:
        version = reader.load_into(policy, newer_than=0, timeout=60)  # the learner's first
        while not stop.is_set():
            version = newest_weights(reader, policy, version)
            chunk = alloc_rollout(tx, spec)
            returns = collector.collect(policy, chunk)
            message = {"rollout": chunk, "version": version, "actor": index, "returns": returns}
            del chunk  # the message holds it; nothing here writes to it after the put
            if not put_rollout(tx, message, stop):
                break
    except tensorslab.Closed:
        pass  # the learner closed its receiver: nothing left to collect for
    finally:
        collector.close()
        tx.close()
        reader.close()


# --- the learner ---------------------------------------------------------------------------


def stack(rollouts: list[dict]) -> dict:
    """The rollouts side by side on the environment axis (copies out of the slab)."""
    batch = {}
    for name in rollouts[0]:
        axis = 0 if name == "next_obs" else 1
        batch[name] = torch.cat([rollout[name] for rollout in rollouts], dim=axis)
    return batch


def train(cfg: Config, start_method: str) -> dict:
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=cfg.lr, eps=1e-5)
    tx, rx, writer, reader = open_transport(cfg)
    version = writer.publish(policy.state_dict())
    context = mp.get_context(start_method)
    stop = context.Event()
    processes = [
        context.Process(target=actor, args=(i, cfg, tx, reader, stop), name=f"actor-{i}")
        for i in range(cfg.actors)
    ]
    for process in processes:
        process.start()
    tx.close()  # the actors hold their own handles now
    reader.close()

    began = time.perf_counter()
    first = None  # when the first rollout arrived: the actors' start-up is not in steps/s
    recent: deque[float] = deque(maxlen=cfg.window)
    lags: list[int] = []
    versions_seen: dict[int, list[int]] = {i: [] for i in range(cfg.actors)}
    steps = iteration = episodes = 0
    mean_return = 0.0
    try:
        while True:
            messages = [rx.get(timeout=60) for _ in range(cfg.actors)]
            first = first or time.perf_counter()
            batch = stack([message["rollout"] for message in messages])
            for message in messages:
                lags.append(version - message["version"])
                versions_seen[message["actor"]].append(message["version"])
                recent.extend(message["returns"])
                episodes += len(message["returns"])
            lag = float(np.mean(lags[-cfg.actors :]))
            message = messages = None  # release the chunks: batch holds copies
            ppo_update(policy, optimizer, batch, cfg)
            version = writer.publish(policy.state_dict())
            steps += cfg.actors * cfg.envs * cfg.steps
            iteration += 1
            mean_return = float(np.mean(recent)) if recent else 0.0
            rate = steps / max(time.perf_counter() - first, 1e-9)
            print(
                f"version {version:4d}  steps {steps:7d}  {rate:6.0f} steps/s  "
                f"return {mean_return:5.1f} (last {len(recent)})  lag {lag:.2f}",
                flush=True,
            )
            solved = len(recent) == cfg.window and mean_return >= SOLVED
            if solved or iteration == cfg.max_iterations:
                break
            if time.perf_counter() - began > cfg.time_limit:
                break
    finally:
        stop.set()
        drain(rx, processes)
        writer.close()
    return {
        "iterations": iteration,
        "steps": steps,
        "seconds": time.perf_counter() - began,
        "training_seconds": time.perf_counter() - (first or began),
        "episodes": episodes,
        "mean_return": mean_return,
        "mean_lag": float(np.mean(lags)) if lags else float("nan"),
        "max_lag": max(lags, default=0),
        "versions_seen": versions_seen,
        "final_version": version,
        "exit_codes": [process.exitcode for process in processes],
    }


def drain(rx: tensorslab.Receiver, processes: list, timeout: float = 30.0) -> None:
    """Reads what the actors still put until each has closed its sender, then joins them."""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                rx.get(timeout=0.2)
            except tensorslab.Empty:
                if not any(process.is_alive() for process in processes):
                    break
    except tensorslab.Closed:
        pass  # every actor closed its sender (or exited)
    for process in processes:
        process.join(max(deadline - time.monotonic(), 1.0))
        if process.is_alive():
            print(f"{process.name} did not stop; terminating it", file=sys.stderr)
            process.terminate()
            process.join()
    rx.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few iterations (CI)")
    parser.add_argument("--actors", type=int, default=Config.actors)
    parser.add_argument("--envs", type=int, default=Config.envs, help="environments per actor")
    parser.add_argument("--time-limit", type=float, default=Config.time_limit, help="seconds")
    parser.add_argument("--seed", type=int, default=Config.seed)
    parser.add_argument("--start-method", choices=["spawn", "fork", "forkserver"], default="spawn")
    args = parser.parse_args()
    cfg = Config(actors=args.actors, envs=args.envs, time_limit=args.time_limit, seed=args.seed)
    if args.smoke:
        # Enough iterations that the actors must have picked up weights newer than the first:
        # at most capacity + one per actor rollouts are in flight when a version is published.
        cfg.max_iterations = 8

    result = train(cfg, args.start_method)
    lag = f"mean policy lag {result['mean_lag']:.2f} (max {result['max_lag']})"
    print(
        f"{'solved' if result['mean_return'] >= SOLVED else 'stopped'}: mean return "
        f"{result['mean_return']:.1f} over the last {cfg.window} episodes after "
        f"{result['steps']} env steps, {result['iterations']} updates, "
        f"{result['seconds']:.1f} s ({result['training_seconds']:.1f} s from the first "
        f"rollout); {lag}; actor exit codes {result['exit_codes']}"
    )
    failures = []
    if any(code != 0 for code in result["exit_codes"]):
        failures.append(f"an actor failed: exit codes {result['exit_codes']}")
    if args.smoke:
        seen = result["versions_seen"]
        newest = max((max(versions, default=0) for versions in seen.values()), default=0)
        if result["iterations"] != cfg.max_iterations:
            failures.append(f"{result['iterations']} of {cfg.max_iterations} iterations ran")
        if result["final_version"] != cfg.max_iterations + 1:
            failures.append(f"the learner ended at version {result['final_version']}")
        if newest < 2:
            failures.append(f"no actor picked up new weights: rollout versions {seen}")
        if any(versions != sorted(versions) for versions in seen.values()):
            failures.append(f"an actor went back to older weights: rollout versions {seen}")
        if np.isnan(result["mean_lag"]):
            failures.append("no policy lag was measured")
    elif result["mean_return"] < SOLVED:
        failures.append(f"mean return {result['mean_return']:.1f} < {SOLVED}")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
