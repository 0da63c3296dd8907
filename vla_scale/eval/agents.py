"""Agents that act in an `Env`: a trained policy, a seeded random baseline and the scripted expert.

A policy predicts an action *chunk* per query; `ChunkExecutor` turns chunks into one action
per step: it executes the first `exec_steps` actions open-loop before asking again, and with
`ensemble` it averages every chunk that covers the current step with exponential weights
that favour the oldest prediction (temporal ensembling, ACT, Zhao et al. 2023), which smooths
the seams between chunks.

With a simulated inference delay (`Execution.delay`: `vla-scale eval --delay D --overlap K [--rtc]`) the
policy's chunks go through the deploy-side `AsyncChunkExecutor` instead: the next chunk is requested when K
actions remain and executed from D steps after its request (its first D rows stale), as on a robot whose
inference takes D control steps; `--rtc` adds real-time chunking (flow policies). Every policy agent reports per
episode how far the action jumps where a new chunk takes over against between steps of one chunk
(`episode_info`), the smoothness real-time chunking is for.
"""

from __future__ import annotations

import abc
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

    def planned(self) -> np.ndarray | None:
        """The newest chunk's action for the current step, None if it does not cover it."""
        if not self._chunks:
            return None
        start, chunk = self._chunks[-1]
        return chunk[self.t - start] if self.t < start + len(chunk) else None

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

    def episode_info(self) -> dict[str, Any]:
        """Figures about the episode just run, added to its record in results.json."""
        return {}

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


@dataclass(frozen=True)
class Execution:
    """How a policy's chunks become actions: `ChunkExecutor` (exec_steps, ensemble), or with `delay` (simulated
    inference latency in steps) the asynchronous executor requesting at `overlap` remaining actions (default:
    `delay`), with real-time chunking if `rtc`."""

    exec_steps: int = 1
    ensemble: bool = False
    ensemble_k: float = 0.01
    delay: int | None = None
    overlap: int | None = None
    rtc: bool = False

    def check(self) -> None:
        if self.delay is None:
            if self.overlap is not None or self.rtc:
                raise ValueError("--overlap and --rtc need --delay D (the simulated inference latency in steps)")
            return
        if self.exec_steps != 1 or self.ensemble:
            raise ValueError(
                "--delay runs chunks asynchronously (a new one every `overlap` steps): drop --exec-steps/--ensemble"
            )
        if self.delay < 1:
            raise ValueError(f"--delay must be >= 1 step, not {self.delay}")
        if self.overlap is not None and self.overlap < self.delay:
            raise ValueError(
                f"--overlap {self.overlap} < --delay {self.delay}: the next chunk is requested when `overlap` "
                "actions remain and must arrive before they run out"
            )


class ChunkingAgent(Agent):
    """A policy queried for action chunks (`_query`), executed per `Execution`; subclasses say where the policy
    runs (in-process `PolicyAgent`, or behind a server: `vla_scale.serve.agent.ServerPolicyAgent`)."""

    name = "policy"

    def _setup(self, execution: Execution, query_every_step: bool, can_inpaint: bool) -> None:
        execution.check()
        self.execution = execution
        # A frame history (window > 1) or a recurrent head must see every frame, so such a policy
        # is queried at every step and only the queries at replanning steps are executed.
        self._query_every_step = query_every_step
        self.executor = ChunkExecutor(execution.exec_steps, execution.ensemble, execution.ensemble_k)
        self.async_executor = None
        if execution.delay is not None:
            if query_every_step:
                raise ValueError(
                    "--delay: this policy keeps a frame history or a recurrent head, which must see every frame; "
                    "asynchronous execution queries it only when a chunk is requested"
                )
            if execution.rtc and not can_inpaint:
                raise ValueError("--rtc (real-time chunking) needs a flow policy (model.action_space: flow)")
            from vla_scale.serve.executor import AsyncChunkExecutor

            self.async_executor = AsyncChunkExecutor(
                self._query,
                overlap=execution.overlap or execution.delay,
                inpaint=execution.rtc,
                delay_ticks=execution.delay,
            )
        self._reset_tracking()

    @abc.abstractmethod
    def _query(self, obs: EnvObservation, prefix: np.ndarray | None = None, prefix_delay: int = 0) -> np.ndarray:
        """The action chunk [N, A] for this step's observation (`prefix`, `prefix_delay`: real-time chunking)."""

    def _reset_tracking(self) -> None:
        self._last: np.ndarray | None = None
        self._source = -1  # which chunk (counted from the episode's first) the last action came from
        self._pushes = 0  # chunks given to the synchronous executor
        self._jumps: dict[bool, list[float]] = {True: [], False: []}  # at a chunk switch / within a chunk
        self._departures: list[float] = []  # at a switch: the new chunk's action against the old chunk's plan

    def _start_episode(self) -> None:
        self.executor.reset()
        if self.async_executor is not None:
            self.async_executor.reset()
        self._reset_tracking()

    def act(self, obs: EnvObservation) -> np.ndarray:
        plan = (self.async_executor or self.executor).planned()  # the current chunk's plan for this step
        if self.async_executor is not None:
            action = self.async_executor.act(obs)
            source = self.async_executor.stats.chunks  # chunks adopted so far: the newest is this action's
        else:
            due = self.executor.due()
            if due or self._query_every_step:
                chunk = self._query(obs)
                if due:
                    self.executor.push(chunk)
                    self._pushes += 1
            source = self._pushes
            action = self.executor.pop()
        switch = source != self._source
        if self._last is not None:
            self._jumps[switch].append(float(np.linalg.norm(action - self._last)))
            # ensembling blends the new chunk with the ones it overlaps instead of replacing one: no departure
            if switch and plan is not None and not self.execution.ensemble:
                self._departures.append(float(np.linalg.norm(action - plan)))
        self._last, self._source = np.asarray(action, np.float32), source
        return action

    def episode_info(self) -> dict[str, Any]:
        """Raw action units, L2: the mean change of the action where a new chunk takes over (`switch_jump`) and
        between two steps of one chunk (`step_jump`), and at a switch how far the new chunk's action departs from
        what the replaced chunk planned for that step (`switch_departure`, switches where it still covered it; not
        with --ensemble, which blends chunks instead of replacing one); with --delay also the executor's stalled
        steps and stale rows skipped."""
        mean = lambda xs: float(np.mean(xs)) if xs else None  # noqa: E731
        info: dict[str, Any] = {
            "chunk_switches": len(self._jumps[True]),
            "steps_within_chunks": len(self._jumps[False]),
            "planned_switches": len(self._departures),
            "switch_jump": mean(self._jumps[True]),
            "step_jump": mean(self._jumps[False]),
            "switch_departure": mean(self._departures),
        }
        if self.async_executor is not None:
            stats = self.async_executor.stats
            info.update(stalled_steps=stats.stalled_ticks, stale_rows_skipped=stats.skipped_actions)
        return info

    def close(self) -> None:
        if self.async_executor is not None:
            self.async_executor.close()


class PolicyAgent(ChunkingAgent):
    """A `vla_scale.policy.Policy` (export folder) loaded in this process."""

    def __init__(self, path: str | Path, execution: Execution | None = None, device: str = "cpu") -> None:
        from vla_scale.policy import Policy

        self.policy = Policy.from_pretrained(path, device=device)
        model = self.policy.model
        self._setup(
            execution or Execution(),
            query_every_step=self.policy.window_size > 1 or bool(getattr(model, "stepwise", False)),
            can_inpaint=self.policy.can_inpaint,
        )

    def reset(self, env: Env, seed: int) -> None:
        if env.state_dim != self.policy.state_dim or env.action_space.dim != self.policy.action_dim:
            raise ValueError(
                f"the policy was trained on state dim {self.policy.state_dim} / action dim {self.policy.action_dim}; "
                f"suite {env.suite} has {env.state_dim} / {env.action_space.dim}"
            )
        self.policy.reset(seed)  # a flow policy's sampled chunks then depend on the episode's seed only
        self._start_episode()

    def _query(self, obs: EnvObservation, prefix: np.ndarray | None = None, prefix_delay: int = 0) -> np.ndarray:
        return self.policy.predict(
            self._frames(obs), obs.instruction, obs.state, prefix=prefix, prefix_delay=prefix_delay
        )

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
    delay: int | None = None,
    overlap: int | None = None,
    rtc: bool = False,
) -> Agent:
    """An agent by name (what `EvalConfig`'s agent factory calls in each worker); a policy agent with `server`
    (ws://host:port of `vla-scale serve`) queries the served policy instead of loading `path`. `delay`,
    `overlap`, `rtc`: simulated inference latency with asynchronous execution (`Execution`)."""
    if kind == "random":
        return RandomAgent()
    if kind == "expert":
        return ExpertAgent()
    if kind == "policy":
        execution = Execution(exec_steps=exec_steps, ensemble=ensemble, delay=delay, overlap=overlap, rtc=rtc)
        execution.check()  # before a model is loaded or a server contacted
        if server is not None:
            from vla_scale.serve.agent import ServerPolicyAgent

            return ServerPolicyAgent(server, execution)
        if path is None:
            raise ValueError("the policy agent needs the path of an export folder")
        return PolicyAgent(path, execution, device=device)
    raise ValueError(f"unknown agent {kind!r}; choose one of {', '.join(AGENTS)}")
