"""The procedural scene of the `instruct` suite: four blocks that differ only in colour.

No asset files: the MJCF is a string built here. A table, a marked goal disc at its centre,
four equal cubes (red, green, blue, yellow) on a ring around the goal, and a spherical pusher
moved by a mocap body. The layout depends only on the seed, so every task of a seed shares
the scene and the instruction is the only cue to which block matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.1, 0.1),
    "green": (0.1, 0.7, 0.15),
    "blue": (0.1, 0.25, 0.9),
    "yellow": (0.95, 0.85, 0.1),
}
BLOCK_HALF = 0.03  # cube half size (m)
PUSHER_RADIUS = 0.02
GOAL_POS = np.array([0.0, 0.0])
GOAL_RADIUS = 0.06  # a block whose centre is inside this disc is "at the goal"
TABLE_HALF = 0.4
RING_RADIUS = (0.14, 0.22)  # block distance from the goal centre
MIN_ANGLE_GAP = np.deg2rad(60)  # between neighbouring blocks: their push paths never cross
HAND_HOME = np.array([0.0, -0.3, 0.16])
HAND_START_X, HAND_START_Y, HAND_START_Z = (-0.3, 0.3), (-0.32, 0.3), (0.12, 0.2)  # reset: uniform in this box
HAND_LOW = np.array([-0.36, -0.36, PUSHER_RADIUS + 0.002])
HAND_HIGH = np.array([0.36, 0.36, 0.25])
TIMESTEP = 0.002
CAMERA = "top"
WRIST_CAMERA = "wrist"


@dataclass(frozen=True)
class Layout:
    """Initial scene of one seed: block xy and yaw per colour, pusher start position."""

    block_xy: dict[str, np.ndarray]
    block_yaw: dict[str, float]
    hand: np.ndarray


def sample_layout(seed: int) -> Layout:
    """Blocks at random angles (>= 60 degrees apart) and radii around the goal; pusher anywhere above the table."""
    rng = np.random.default_rng([seed, 0x1A5])
    while True:
        angles = rng.uniform(0, 2 * np.pi, size=len(COLOURS))
        ordered = np.sort(angles)
        gaps = np.diff(np.concatenate([ordered, ordered[:1] + 2 * np.pi]))
        if gaps.min() >= MIN_ANGLE_GAP:
            break
    radii = rng.uniform(*RING_RADIUS, size=len(COLOURS))
    yaws = rng.uniform(-np.pi / 4, np.pi / 4, size=len(COLOURS))
    xy = {c: GOAL_POS + r * np.array([np.cos(a), np.sin(a)]) for c, a, r in zip(COLOURS, angles, radii, strict=True)}
    # The pusher starts anywhere over the table, above the blocks: from a fixed home, the pusher's position a
    # few steps in would tell which block it is heading for, and a policy could copy its own motion instead of
    # reading the instruction (only the first step would need it).
    hand = np.array([rng.uniform(*HAND_START_X), rng.uniform(*HAND_START_Y), rng.uniform(*HAND_START_Z)])
    return Layout(block_xy=xy, block_yaw={c: float(y) for c, y in zip(COLOURS, yaws, strict=True)}, hand=hand)


def scene_xml() -> str:
    """The MJCF of the scene (blocks at the origin; `reset` places them)."""
    blocks = "\n".join(
        f"""    <body name="block_{c}" pos="0 0 {BLOCK_HALF}">
      <freejoint name="block_{c}"/>
      <geom name="block_{c}" type="box" size="{BLOCK_HALF} {BLOCK_HALF} {BLOCK_HALF}" rgba="{r} {g} {b} 1"
            mass="0.2" friction="0.6 0.005 0.0001"/>
    </body>"""
        for c, (r, g, b) in COLOURS.items()
    )
    return f"""<mujoco model="instruct">
  <option timestep="{TIMESTEP}" integrator="implicitfast"/>
  <visual><quality shadowsize="0" offsamples="0"/><headlight ambient="0.5 0.5 0.5" diffuse="0.5 0.5 0.5"/></visual>
  <worldbody>
    <light pos="0 0 1.5" dir="0 0 -1" directional="true" castshadow="false"/>
    <geom name="table" type="box" pos="0 0 -0.02" size="{TABLE_HALF} {TABLE_HALF} 0.02" rgba="0.55 0.45 0.35 1"
          friction="0.5 0.005 0.0001"/>
    <geom name="goal" type="cylinder" pos="{GOAL_POS[0]} {GOAL_POS[1]} 0.0005" size="{GOAL_RADIUS} 0.0005"
          rgba="0.95 0.95 0.95 1" contype="0" conaffinity="0"/>
    <camera name="{CAMERA}" pos="0 -0.5 0.8" xyaxes="1 0 0 0 0.85 0.53" fovy="45"/>
{blocks}
    <body name="pusher" mocap="true" pos="{HAND_HOME[0]} {HAND_HOME[1]} {HAND_HOME[2]}">
      <geom name="pusher" type="sphere" size="{PUSHER_RADIUS}" rgba="0.15 0.15 0.15 1" friction="0.2 0.005 0.0001"
            priority="1" solref="0.004 1" solimp="0.95 0.99 0.001"/>
      <camera name="{WRIST_CAMERA}" pos="0 -0.08 0.1" xyaxes="1 0 0 0 0.6 0.8" fovy="70"/>
    </body>
  </worldbody>
</mujoco>
"""


def box_distance(point: np.ndarray, centre: np.ndarray, rotation: np.ndarray, half: float) -> float:
    """Distance from `point` to the surface of a cube (0 inside), in the cube's own frame."""
    local = rotation.T @ (point - centre)
    outside = np.maximum(np.abs(local) - half, 0.0)
    return float(np.linalg.norm(outside))
