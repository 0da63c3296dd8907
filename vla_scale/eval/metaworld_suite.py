"""`metaworld` suite: Meta-World (MuJoCo, MIT) multi-task manipulation behind the `Env` contract.

Each task keeps its own Meta-World environment (a different MJCF per task), created on first
use. A seed fixes the task's random vector (object and goal positions) the way Meta-World's
benchmarks build their tasks — a reset with an unfrozen vector, which some tasks redraw until
object and goal are apart, then a `Task` holding that `rand_vec` — but with the env's generator
seeded by `seed` rather than from a fixed list of 50, so every seed is its own scene.
The policy's state is proprioception only (`obs[:4]`: hand xyz + gripper opening); the full
observation (object and goal positions) feeds only Meta-World's scripted expert. Frames come
from the `corner3` camera, which MuJoCo renders upside down (flipped here).
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any

import numpy as np

from vla_scale.eval.env import ActionSpace, Env, EnvObservation, StepResult
from vla_scale.eval.render import Renderer, import_mujoco, require_camera

INSTRUCTIONS: dict[str, str] = {
    "reach-v3": "reach the goal position",
    "push-v3": "push the puck to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "door-open-v3": "open the door",
    "drawer-open-v3": "open the drawer",
    "drawer-close-v3": "close the drawer",
    "button-press-topdown-v3": "press the button down from the top",
    "peg-insert-side-v3": "insert the peg into the hole from the side",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
MT10_TASKS: tuple[str, ...] = tuple(INSTRUCTIONS)
DEFAULT_TASKS: tuple[str, ...] = (
    "reach-v3",
    "push-v3",
    "button-press-topdown-v3",
    "drawer-close-v3",
    "door-open-v3",
    "window-open-v3",
)
DEFAULT_CAMERA = "corner3"
WRIST_CAMERA = "gripperPOV"
UPSIDE_DOWN = ("corner", "corner2", "corner3", "corner4")  # cameras MuJoCo renders rotated by 180 degrees
MAX_STEPS = 200  # the scripted experts finish these tasks well within it (Meta-World's own limit is 500)


class MetaWorldEnv(Env):
    """Meta-World tasks with natural-language instructions; one scene per (task, seed)."""

    suite = "metaworld"
    shared_scene = False
    state_dim = 4

    def __init__(
        self,
        tasks: Sequence[str] = DEFAULT_TASKS,
        image_size: int = 64,
        camera: str | None = None,
        wrist: bool = False,
        max_steps: int = MAX_STEPS,
    ) -> None:
        import_mujoco()  # headless GL default and a clear error before Meta-World imports mujoco
        unknown = [t for t in tasks if t not in INSTRUCTIONS]
        if unknown:
            raise ValueError(f"no instruction for Meta-World task(s) {unknown}; available: {', '.join(INSTRUCTIONS)}")
        self.tasks = tuple(tasks)
        self.max_steps = max_steps
        self.action_space = ActionSpace(4, -np.ones(4), np.ones(4))
        self.camera = camera or DEFAULT_CAMERA
        self.wrist = wrist
        self.image_size = image_size
        self._envs: dict[str, tuple[Any, Renderer, Any]] = {}  # task -> (env, renderer, expert)
        self._task: str | None = None
        self._obs: np.ndarray | None = None
        self._info: dict = {}
        self._instruction = ""
        self._t = 0

    def _get(self, task: str) -> tuple[Any, Renderer, Any]:
        """The task's Meta-World env, renderer and expert, created on first use."""
        if task not in self._envs:
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS
            from metaworld.policies import ENV_POLICY_MAP

            env = ALL_V3_ENVIRONMENTS[task]()
            env.max_path_length = 2**62  # the episode limit is ours (`max_steps`), not Meta-World's
            for cam in (self.camera, WRIST_CAMERA) if self.wrist else (self.camera,):
                require_camera(env.model, cam)
            renderer = Renderer(env.model, self.image_size, flipped=UPSIDE_DOWN)
            self._envs[task] = (env, renderer, ENV_POLICY_MAP[task]())
        return self._envs[task]

    @property
    def raw_env(self) -> Any:
        """The current task's Meta-World environment (for inspection; do not step it directly)."""
        if self._task is None:
            raise RuntimeError("call reset() first")
        return self._get(self._task)[0]

    def instruction(self, task: str) -> str:
        self.check_task(task)
        return INSTRUCTIONS[task]

    def reset(self, task: str, seed: int, instruction: str | None = None) -> EnvObservation:
        self.check_task(task)
        from metaworld.env_dict import ML1_ARGS_KWARGS
        from metaworld.types import Task

        mujoco = import_mujoco()
        env, _, _ = self._get(task)
        kwargs = {k: v for k, v in ML1_ARGS_KWARGS[task]["kwargs"].items() if k != "task_id"}

        def set_task(rand_vec: np.ndarray) -> None:
            data = dict(kwargs, rand_vec=rand_vec, env_cls=type(env), partially_observable=False)
            env.set_task(Task(env_name=task, data=pickle.dumps(data)))

        # 1. draw the task's random vector as Meta-World's benchmarks do (a reset with an unfrozen vector;
        #    some tasks redraw until goal and object are apart), from the env's generator seeded with `seed`
        set_task(env._random_reset_space.low)
        env._freeze_rand_vec, env.seeded_rand_vec = False, True
        env.seed(seed)
        mujoco.mj_resetData(env.model, env.data)  # clear solver warm starts: the same seed gives the same rollout
        env.reset()
        # 2. freeze it as the episode's task and reset from a clean state
        set_task(np.array(env._last_rand_vec, copy=True))
        mujoco.mj_resetData(env.model, env.data)
        self._obs, _ = env.reset()
        self._task, self._t, self._info = task, 0, {}
        self._instruction = self.instruction(task) if instruction is None else instruction
        return self._observe()

    def step(self, action: np.ndarray) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        env = self._get(self._task)[0]
        obs, _reward, _term, _trunc, info = env.step(self.action_space.clip(action).astype(np.float32))
        self._obs, self._info = obs, info
        self._t += 1
        success = bool(info.get("success", 0.0))
        done = success or self._t >= self.max_steps
        numeric = {k: float(v) for k, v in info.items() if isinstance(v, (bool, int, float, np.number))}
        out = {"step": self._t, "task": self._task, **numeric}
        return StepResult(self._observe(), success, done, out)

    def success(self, task: str) -> bool:
        """Meta-World's success flag of the last step; only the current task can be scored."""
        if task != self._task:
            raise ValueError(f"Meta-World scenes are not shared: only the current task {self._task!r} can be scored")
        return bool(self._info.get("success", 0.0))

    def expert_action(self) -> np.ndarray:
        if self._task is None or self._obs is None:
            raise RuntimeError("call reset() before expert_action()")
        expert = self._get(self._task)[2]
        return np.clip(expert.get_action(self._obs), -1.0, 1.0).astype(np.float32)

    def _observe(self) -> EnvObservation:
        env, renderer, _ = self._get(self._task)
        image = renderer.render(env.data, self.camera) if self.observe_images else None
        wrist = renderer.render(env.data, WRIST_CAMERA) if self.wrist and self.observe_images else None
        state = np.asarray(self._obs[:4], dtype=np.float32)
        return EnvObservation(image=image, wrist_image=wrist, state=state, instruction=self._instruction)

    def close(self) -> None:
        for env, renderer, _ in self._envs.values():
            renderer.close()
            env.close()
        self._envs.clear()
