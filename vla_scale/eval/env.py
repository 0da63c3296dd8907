"""The one environment contract every closed-loop suite implements.

Collectors, the evaluation runner and evaluation during training only see this interface, so
a new simulator (LIBERO, CALVIN, SimplerEnv) or a real robot plugs in by subclassing `Env`.
The policy gets camera frames, proprioception and the instruction — never object positions —
so whatever it needs to know about the scene must come from the image and the text.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import numpy as np


@dataclass
class EnvObservation:
    """What a policy sees at one step."""

    image: np.ndarray | None  # uint8 [H, W, 3] static camera, upright; None while `Env.observe_images` is off
    wrist_image: np.ndarray | None  # uint8 [H, W, 3] or None
    state: np.ndarray  # float32 [S] proprioception only (hand xyz + gripper)
    instruction: str


@dataclass
class StepResult:
    """The outcome of one `Env.step`."""

    observation: EnvObservation
    success: bool  # the instructed task's success
    done: bool  # success or time limit reached
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class ActionSpace:
    """Box action space; `Env.step` clips actions to [low, high]."""

    dim: int
    low: np.ndarray
    high: np.ndarray

    def clip(self, action: np.ndarray) -> np.ndarray:
        """Validate the shape and clip to the box (NaN becomes 0 so a broken policy cannot crash the sim)."""
        a = np.asarray(action, dtype=np.float64).reshape(-1)
        if a.shape[0] != self.dim:
            raise ValueError(f"action has {a.shape[0]} values, this environment takes {self.dim}")
        return np.clip(np.nan_to_num(a, nan=0.0), self.low, self.high)


class Env(abc.ABC):
    """A seeded, instruction-conditioned closed-loop environment.

    Episodes are identified by (task, seed): `reset(task, seed)` always produces the same
    initial scene, image and state. `shared_scene` says whether the scene of a seed is the same
    for every task, in which case another task's instruction can be shown in it and scored
    with `success(other_task)` (swapped-instruction evaluation).
    """

    suite: str
    tasks: tuple[str, ...]
    max_steps: int
    action_space: ActionSpace
    state_dim: int
    shared_scene: bool
    # False: observations carry no camera frames (image and wrist_image None). Rendering is most of a simulated
    # step's cost (Meta-World: ~97%), and the scripted expert and random baselines never look at the frames.
    observe_images: bool = True

    @abc.abstractmethod
    def instruction(self, task: str) -> str:
        """The natural-language instruction of `task`."""

    @abc.abstractmethod
    def reset(self, task: str, seed: int, instruction: str | None = None) -> EnvObservation:
        """Start an episode of `task` in the scene of `seed`; `instruction` overrides the shown text."""

    @abc.abstractmethod
    def step(self, action: np.ndarray) -> StepResult:
        """Apply one (clipped) action and return the new observation and success flag."""

    @abc.abstractmethod
    def success(self, task: str) -> bool:
        """Whether `task` is achieved in the current scene (non-shared suites: only the current task)."""

    @abc.abstractmethod
    def expert_action(self) -> np.ndarray:
        """The scripted expert's action for the current task and state."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the simulator and renderer (call before exit: EGL complains otherwise)."""

    def check_task(self, task: str) -> None:
        """Raise a clear error for a task this suite does not have."""
        if task not in self.tasks:
            raise ValueError(f"suite {self.suite!r} has no task {task!r}; tasks: {', '.join(self.tasks)}")

    def __enter__(self) -> Env:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
