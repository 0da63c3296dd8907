"""Agents that act in an `Env`: a trained policy, a seeded random baseline and the scripted expert.

A policy predicts an action *chunk* per query; `ChunkExecutor` turns chunks into one action
per step: it executes the first `exec_steps` actions open-loop before asking again, and with
`ensemble` it averages every chunk that covers the current step with exponential weights
that favour the oldest prediction (temporal ensembling, ACT, Zhao et al. 2023), which smooths
the seams between chunks.
"""

from __future__ import annotations

import abc
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from vla_scale.eval.env import Env, EnvObservation

AGENTS = ("policy", "random", "expert")


class ChunkExecutor:
    """Per-step actions from action chunks; call `due()`, `push(chunk)` when due, then `pop()` once per step."""

    def __init__(self, exec_steps: int = 1, ensemble: bool = False, ensemble_k: float = 0.01) -> None:
        if exec_steps < 1:
            raise ValueError(f"exec_steps must be >= 1, not {exec_steps}")
        self.exec_steps = exec_steps
        self.ensemble = ensemble
        self.ensemble_k = ensemble_k
        self.reset()

    def reset(self) -> None:
        """Start a new episode: step 0, no chunks."""
        self.t = 0
        self._chunks: deque[tuple[int, np.ndarray]] = deque()  # (step it was predicted at, [N, A]), oldest first

    def due(self) -> bool:
        """Whether a new chunk must be predicted at this step (every `exec_steps` steps)."""
        return self.t % self.exec_steps == 0 or not self._chunks

    def push(self, chunk: np.ndarray) -> None:
        """Register the chunk predicted at the current step; its row 0 is this step's action."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim != 2 or chunk.shape[0] < 1:
            raise ValueError(f"an action chunk must be [N, A] with N >= 1, got {chunk.shape}")
        if chunk.shape[0] < self.exec_steps:
            raise ValueError(f"exec_steps {self.exec_steps} exceeds the policy's chunk length {chunk.shape[0]}")
        if not self.ensemble:
            self._chunks.clear()
        self._chunks.append((self.t, chunk))

    def pop(self) -> np.ndarray:
        """This step's action; advances to the next step."""
        while self._chunks and self._chunks[0][0] + len(self._chunks[0][1]) <= self.t:
            self._chunks.popleft()  # no longer covers the current step
        if not self._chunks:
            raise RuntimeError("no action chunk covers this step; push() one when due() says so")
        actions = np.stack([chunk[self.t - start] for start, chunk in self._chunks])
        weights = np.exp(-self.ensemble_k * np.arange(len(actions)))  # index 0 = oldest prediction
        self.t += 1
        return (weights[:, None] * actions).sum(0) / weights.sum()


class Agent(abc.ABC):
    """Chooses one action per step of an episode."""

    name = "agent"
    needs_images = True  # False: the runner turns the env's rendering off (`Env.observe_images`) unless filming

    def reset(self, env: Env, seed: int) -> None:  # noqa: B027 - optional hook
        """Called after `env.reset`, before the episode's first `act`."""

    @abc.abstractmethod
    def act(self, obs: EnvObservation) -> np.ndarray:
        """The action for this step (raw units of the env's action space)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free what the agent holds (model, files)."""


class RandomAgent(Agent):
    """Uniform actions in the env's action space; the generator is reseeded per episode, so an episode's
    actions depend on its seed only (not on which worker ran it or what it ran before)."""

    name = "random"
    needs_images = False

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)
        self._low = self._high = np.zeros(0, np.float32)

    def reset(self, env: Env, seed: int) -> None:
        self._rng = np.random.default_rng([seed, 0x5A5D])
        self._low, self._high = env.action_space.low, env.action_space.high

    def act(self, obs: EnvObservation) -> np.ndarray:
        return self._rng.uniform(self._low, self._high).astype(np.float32)


class ExpertAgent(Agent):
    """The env's scripted expert (an upper reference for success rates)."""

    name = "expert"
    needs_images = False

    def __init__(self) -> None:
        self._env: Env | None = None

    def reset(self, env: Env, seed: int) -> None:
        self._env = env

    def act(self, obs: EnvObservation) -> np.ndarray:
        assert self._env is not None, "reset() first"
        return np.asarray(self._env.expert_action(), dtype=np.float32)


class PolicyAgent(Agent):
    """A `vla_scale.policy.Policy` (export folder) run through a `ChunkExecutor`."""

    name = "policy"

    def __init__(
        self,
        path: str | Path,
        exec_steps: int = 1,
        ensemble: bool = False,
        ensemble_k: float = 0.01,
        device: str = "cpu",
    ) -> None:
        from vla_scale.policy import Policy

        self.policy = Policy.from_pretrained(path, device=device)
        self.executor = ChunkExecutor(exec_steps, ensemble, ensemble_k)
        # A frame history (window > 1) or a recurrent head must see every frame, so such a policy
        # is queried at every step and only the queries at replanning steps are executed.
        self._query_every_step = self.policy.window_size > 1 or bool(getattr(self.policy.model, "stepwise", False))

    def reset(self, env: Env, seed: int) -> None:
        if env.state_dim != self.policy.state_dim or env.action_space.dim != self.policy.action_dim:
            raise ValueError(
                f"the policy was trained on state dim {self.policy.state_dim} / action dim {self.policy.action_dim}; "
                f"suite {env.suite} has {env.state_dim} / {env.action_space.dim}"
            )
        self.policy.reset(seed)  # a flow policy's sampled chunks then depend on the episode's seed only
        self.executor.reset()

    def act(self, obs: EnvObservation) -> np.ndarray:
        due = self.executor.due()
        if due or self._query_every_step:
            chunk = self.policy.predict(self._frames(obs), obs.instruction, obs.state)
            if due:
                self.executor.push(chunk)
        return self.executor.pop()

    def _frames(self, obs: EnvObservation) -> np.ndarray | dict[str, np.ndarray]:
        if obs.wrist_image is None or not self.policy.wrist_camera:
            return obs.image
        return {str(self.policy.static_camera): obs.image, self.policy.wrist_camera: obs.wrist_image}


def make_agent(
    env: Env,
    kind: str,
    path: str | Path | None = None,
    exec_steps: int = 1,
    ensemble: bool = False,
    device: str = "cpu",
    server: str | None = None,
) -> Agent:
    """An agent by name (what `EvalConfig`'s agent factory calls in each worker); a policy agent with `server`
    (ws://host:port of `vla-scale serve`) queries the served policy instead of loading `path`."""
    if kind == "random":
        return RandomAgent()
    if kind == "expert":
        return ExpertAgent()
    if kind == "policy":
        if server is not None:
            from vla_scale.serve.agent import ServerPolicyAgent

            return ServerPolicyAgent(server, exec_steps=exec_steps, ensemble=ensemble)
        if path is None:
            raise ValueError("the policy agent needs the path of an export folder")
        return PolicyAgent(path, exec_steps=exec_steps, ensemble=ensemble, device=device)
    raise ValueError(f"unknown agent {kind!r}; choose one of {', '.join(AGENTS)}")
