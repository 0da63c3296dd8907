"""`instruct` suite: touch or push one of four blocks that differ only in colour.

Tasks are `touch_<colour>` (bring the pusher into contact with the block) and `push_<colour>`
(push the block into the white goal disc). Action: [dx, dy, dz, gripper] in [-1, 1], scaled to
`MAX_STEP` metres per step (the gripper value is ignored; it keeps the 4-D action space of
Meta-World). State: pusher xyz + a constant 0 gripper value. The scripted expert is a clipped
proportional controller towards one waypoint computed from the scene, so its action is a
smooth function of the target's position that a policy can imitate from the image.
"""

from __future__ import annotations

import numpy as np

from vla_scale.eval import instruct_scene as sc
from vla_scale.eval.env import ActionSpace, Env, EnvObservation, StepResult
from vla_scale.eval.render import Renderer, import_mujoco, require_camera

MAX_STEP = 0.02  # metres per step at |action| = 1
SUBSTEPS = 10  # physics steps per action; the pusher is interpolated across them
TOUCH_TOLERANCE = 0.004  # pusher surface within this of the block counts as touching
SAFE_Z = 2 * sc.BLOCK_HALF + sc.PUSHER_RADIUS + 0.03  # travel height above every block
PUSH_Z = sc.BLOCK_HALF  # pusher centre height while pushing
CONTACT_GAP = sc.BLOCK_HALF * 1.45 + sc.PUSHER_RADIUS  # pre-push distance behind the block centre
PUSH_SPEED = 0.6  # fraction of MAX_STEP while pushing, so the block does not slide past the goal


def task_names() -> tuple[str, ...]:
    """All tasks: touch_<colour> then push_<colour>."""
    return tuple(f"{kind}_{c}" for kind in ("touch", "push") for c in sc.COLOURS)


class InstructEnv(Env):
    """Language-grounding suite: the instruction is the only cue to which block matters."""

    suite = "instruct"
    shared_scene = True
    state_dim = 4

    def __init__(
        self, image_size: int = 64, camera: str | None = None, wrist: bool = False, max_steps: int = 80
    ) -> None:
        self._mj = import_mujoco()
        self.tasks = task_names()
        self.max_steps = max_steps
        self.action_space = ActionSpace(4, -np.ones(4), np.ones(4))
        self.camera = camera or sc.CAMERA
        self.wrist = wrist
        self.model = self._mj.MjModel.from_xml_string(sc.scene_xml())
        self.data = self._mj.MjData(self.model)
        require_camera(self.model, self.camera)
        self._renderer = Renderer(self.model, image_size)
        self._block_qpos = {c: self.model.jnt_qposadr[self.model.joint(f"block_{c}").id] for c in sc.COLOURS}
        self._block_geom = {c: self.model.geom(f"block_{c}").id for c in sc.COLOURS}
        self._task: str | None = None
        self._instruction = ""
        self._t = 0

    # ----- scene queries -------------------------------------------------------------------
    @property
    def hand(self) -> np.ndarray:
        """Pusher centre (the commanded mocap position)."""
        return self.data.mocap_pos[0].copy()

    def block_pos(self, colour: str) -> np.ndarray:
        """Block centre xyz."""
        adr = self._block_qpos[colour]
        return self.data.qpos[adr : adr + 3].copy()

    def _touching(self, colour: str) -> bool:
        gid = self._block_geom[colour]
        rot = self.data.geom_xmat[gid].reshape(3, 3)
        dist = sc.box_distance(self.hand, self.data.geom_xpos[gid], rot, sc.BLOCK_HALF)
        return dist - sc.PUSHER_RADIUS <= TOUCH_TOLERANCE

    def _at_goal(self, colour: str) -> bool:
        return bool(np.linalg.norm(self.block_pos(colour)[:2] - sc.GOAL_POS) <= sc.GOAL_RADIUS)

    # ----- Env API --------------------------------------------------------------------------
    def instruction(self, task: str) -> str:
        self.check_task(task)
        kind, colour = task.split("_", 1)
        return f"touch the {colour} block" if kind == "touch" else f"push the {colour} block to the goal"

    def success(self, task: str) -> bool:
        self.check_task(task)
        kind, colour = task.split("_", 1)
        return self._touching(colour) if kind == "touch" else self._at_goal(colour)

    def reset(self, task: str, seed: int, instruction: str | None = None) -> EnvObservation:
        self.check_task(task)
        layout = sc.sample_layout(seed)
        self._mj.mj_resetData(self.model, self.data)  # also clears solver warm starts: same seed, same rollout
        for c, xy in layout.block_xy.items():
            yaw = layout.block_yaw[c]
            adr = self._block_qpos[c]
            self.data.qpos[adr : adr + 7] = [xy[0], xy[1], sc.BLOCK_HALF, np.cos(yaw / 2), 0, 0, np.sin(yaw / 2)]
        self.data.mocap_pos[0] = layout.hand
        self._mj.mj_forward(self.model, self.data)
        self._task, self._t = task, 0
        self._instruction = self.instruction(task) if instruction is None else instruction
        return self._observe()

    def step(self, action: np.ndarray) -> StepResult:
        if self._task is None:
            raise RuntimeError("call reset() before step()")
        a = self.action_space.clip(action)
        start = self.hand
        target = np.clip(start + a[:3] * MAX_STEP, sc.HAND_LOW, sc.HAND_HIGH)
        for i in range(1, SUBSTEPS + 1):
            self.data.mocap_pos[0] = start + (target - start) * (i / SUBSTEPS)
            self._mj.mj_step(self.model, self.data)
        self._t += 1
        success = self.success(self._task)
        done = success or self._t >= self.max_steps
        info = {"step": self._t, "task": self._task, "hand": self.hand}
        return StepResult(self._observe(), success, done, info)

    def expert_action(self) -> np.ndarray:
        if self._task is None:
            raise RuntimeError("call reset() before expert_action()")
        kind, colour = self._task.split("_", 1)
        target, speed = self._expert_target(kind, colour)
        delta = np.clip((target - self.hand) / MAX_STEP, -speed, speed)
        return np.concatenate([delta, [0.0]]).astype(np.float32)

    def _expert_target(self, kind: str, colour: str) -> tuple[np.ndarray, float]:
        """Next waypoint and speed limit: the block's top (touch), or behind it then through it (push)."""
        block = self.block_pos(colour)
        hand = self.hand
        if kind == "touch":
            # descend on a cone above the block so the pusher never clips a block on the way
            contact_z = 2 * sc.BLOCK_HALF + sc.PUSHER_RADIUS - 0.002
            dist = float(np.linalg.norm(block[:2] - hand[:2]))
            return np.array([block[0], block[1], contact_z + min(dist, SAFE_Z - contact_z)]), 1.0
        to_goal = sc.GOAL_POS - block[:2]
        u = to_goal / max(np.linalg.norm(to_goal), 1e-6)
        behind = block[:2] - u * CONTACT_GAP
        rel = hand[:2] - block[:2]
        along = float(rel @ u)  # negative: hand is behind the block (on the side away from the goal)
        lateral = abs(float(rel @ np.array([-u[1], u[0]])))
        aligned = along < -0.5 * CONTACT_GAP and lateral < 0.8 * sc.BLOCK_HALF
        if aligned and hand[2] < PUSH_Z + 0.01:
            # push: head for the goal centre through the block, keeping on the block-goal line
            line = block[:2] - u * (CONTACT_GAP - 0.01)
            return np.array([*(line + u * 0.05), PUSH_Z]), PUSH_SPEED
        if np.linalg.norm(hand[:2] - behind) < 0.01 and along < 0:
            return np.array([*behind, PUSH_Z]), 1.0  # descend behind the block
        if hand[2] < SAFE_Z - 0.01 and np.linalg.norm(hand[:2] - behind) >= 0.01:
            return np.array([*hand[:2], SAFE_Z]), 1.0  # lift clear of the blocks before travelling
        return np.array([*behind, SAFE_Z]), 1.0  # travel above the blocks to behind the target

    def _observe(self) -> EnvObservation:
        image = self._renderer.render(self.data, self.camera) if self.observe_images else None
        wrist = self._renderer.render(self.data, sc.WRIST_CAMERA) if self.wrist and self.observe_images else None
        state = np.array([*self.hand, 0.0], dtype=np.float32)
        return EnvObservation(image=image, wrist_image=wrist, state=state, instruction=self._instruction)

    def close(self) -> None:
        self._renderer.close()
