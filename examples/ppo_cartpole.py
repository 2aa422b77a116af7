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
