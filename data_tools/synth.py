"""A small, learnable, procedurally rendered tabletop task, plus a matching VL set.

Why: every part of vla_scale (reader, model, training, export) needs data that runs in
seconds on a CPU yet can only be solved by using both the image and the instruction.
Each scene holds three coloured objects; the instruction names one by colour, so the
right action depends on where that object is (image) and which one it is (language).

Coordinates are normalised table coordinates: x to the right, y downwards, both in
[0, 1]; pixel (row, col) = (y * H, x * W) in the static camera. z is the end-effector
height above the table in [0, 1]. State = [x, y, z, gripper] and action =
[dx, dy, dz, gripper] (gripper 0 open / 1 closed); `state[t + 1] = state[t] + action[t]`
for x, y, z and `state[t + 1, 3] = action[t, 3]`, exactly, in float32.
"""

from __future__ import annotations

import argparse
import multiprocessing
import multiprocessing.pool
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_tools.writer import ShardWriter
from vla_scale.data.format import Episode, Manifest, VLSample, encode_episode, encode_vl
from vla_scale.data.spaces import Space, Spaces

# [dx, dy, dz, gripper] deltas and [x, y, z, gripper] states; the gripper is a 0 open / 1 closed command.
SPACES = Spaces(
    Space(4, (3,), 0.5, names=("dx", "dy", "dz", "gripper")),
    Space(4, (3,), 0.5, names=("x", "y", "z", "gripper")),
    normalization="mean_std",
    action_mode="relative",
)

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (45, 85, 215),
    "yellow": (235, 205, 40),
    "purple": (140, 65, 185),
    "orange": (240, 135, 30),
}
TABLE_RGB = (185, 170, 145)
FLOOR_RGB = (90, 80, 70)  # outside the table (only the wrist camera sees it)
EE_RGB = (55, 55, 55)
NOUNS = {"square": ("block", "cube", "object"), "disc": ("disc", "puck", "object")}
TEMPLATES = (
    "move to the {c} {n}",
    "reach the {c} {n}",
    "go to the {c} {n}",
    "pick up the {c} {n}",
    "grab the {c} {n}",
    "reach for the {c} {n}",
    "move the gripper to the {c} {n}",
)

NUM_OBJECTS = 3
HALF_SIZE = 0.06  # object half-width (square) or radius (disc), table units
MIN_OBJECT_DIST = 0.25
# The expert is a proportional controller: each step covers GAIN of the remaining xy
# distance and of the height error, so the action is (almost) linear in target - gripper
# position. That keeps the task learnable in minutes by a tiny random-init VLM on a CPU,
# while still requiring both the image (where things are) and the instruction (which one).
GAIN = 0.3  # fraction of the remaining error covered per step
MAX_STEP = 0.25  # cap on the xy move per step (only the farthest starts reach it)
MAX_DZ = 0.3  # cap on the descent per step
STEP_NOISE = 0.004  # std of the xy noise added while travelling
DESCEND_SLOPE = 1.5  # height goal while approaching = Z_GRASP + DESCEND_SLOPE * xy distance
SNAP_DIST = 0.03  # this close in xy (and in height), the next step lands exactly on the target
Z_GRASP = 0.05  # height at which the gripper closes
HOLD_STEPS = 3  # steps the closed gripper is held at the target
MIN_START_DIST = 0.35  # start this far from the target, so episodes are ~14-30 steps
MAX_LENGTH = 48
ROBOT_STREAM, VL_STREAM = 0, 1


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str  # "square" | "disc"
    x: float
    y: float

    @property
    def rgb(self) -> tuple[int, int, int]:
        return PALETTE[self.colour]

    def noun(self, rng: np.random.Generator) -> str:
        return str(rng.choice(NOUNS[self.shape]))

    def as_meta(self) -> dict:
        return {"colour": self.colour, "shape": self.shape, "xy": [self.x, self.y], "half_size": HALF_SIZE}


def item_rng(seed: int, stream: int, index: int) -> np.random.Generator:
    """One generator per item, so the output does not depend on worker count or order."""
    return np.random.default_rng([seed, stream, index])


def sample_objects(rng: np.random.Generator) -> list[SceneObject]:
    """Three objects of distinct colours at random, well separated positions."""
    colours = rng.choice(list(PALETTE), size=NUM_OBJECTS, replace=False)
    points: list[np.ndarray] = []
    while len(points) < NUM_OBJECTS:
        p = rng.uniform(0.12, 0.88, size=2)
        if all(np.linalg.norm(p - q) >= MIN_OBJECT_DIST for q in points):
            points.append(p)
    shapes = rng.choice(list(NOUNS), size=NUM_OBJECTS)
    return [
        SceneObject(str(c), str(s), round(float(p[0]), 4), round(float(p[1]), 4))
        for c, s, p in zip(colours, shapes, points, strict=True)
    ]


def render(
    objects: list[SceneObject],
    ee: np.ndarray,
    size: int,
    view: tuple[float, float, float] = (0.5, 0.5, 1.0),
    table_rgb: tuple[int, int, int] = TABLE_RGB,
) -> np.ndarray:
    """Draw the scene as uint8 [size, size, 3].

    `view` = (centre x, centre y, span) of the table region shown, so the static camera
    (whole table) and a wrist camera (a window around the gripper) share one renderer.
    """
    return draw_gripper(draw_scene(objects, size, view, table_rgb), ee, view)


def _pixel_coords(size: int, view: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Table coordinates of the pixel centres: x as a row vector, y as a column vector."""
    cx, cy, span = view
    u = (np.arange(size) + 0.5) / size - 0.5
    return (cx + u * span)[None, :], (cy + u * span)[:, None]


def draw_scene(
    objects: list[SceneObject], size: int, view: tuple[float, float, float], table_rgb: tuple[int, int, int]
) -> np.ndarray:
    """Table and objects, without the gripper (static across an episode, so drawn once)."""
    xs, ys = _pixel_coords(size, view)
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = FLOOR_RGB
    img[(xs >= 0) & (xs <= 1) & (ys >= 0) & (ys <= 1)] = table_rgb
    for obj in objects:
        if obj.shape == "square":
            mask = (np.abs(xs - obj.x) <= HALF_SIZE) & (np.abs(ys - obj.y) <= HALF_SIZE)
        else:
            mask = (xs - obj.x) ** 2 + (ys - obj.y) ** 2 <= HALF_SIZE**2
        img[mask] = obj.rgb
    return img


def draw_gripper(scene: np.ndarray, ee: np.ndarray, view: tuple[float, float, float]) -> np.ndarray:
    """A copy of `scene` with the end-effector ring: radius grows with height z, thicker when closed."""
    size = scene.shape[0]
    xs, ys = _pixel_coords(size, view)
    x, y, z, grip = (float(v) for v in ee)
    radius = 0.03 + 0.07 * z
    thickness = (1.2 if grip < 0.5 else 2.4) * view[2] / size
    img = scene.copy()
    img[np.abs(np.sqrt((xs - x) ** 2 + (ys - y) ** 2) - radius) <= thickness / 2] = EE_RGB
    return img


def wrist_view(ee: np.ndarray) -> tuple[float, float, float]:
    """A window centred on the gripper that narrows as it descends."""
    return float(ee[0]), float(ee[1]), 0.25 + 0.5 * float(ee[2])


def expert_action(state: np.ndarray, target: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Move a fixed fraction of the way to the target, descending as it gets closer; close when there."""
    delta = target - state[:2].astype(np.float64)
    dist = float(np.linalg.norm(delta))
    z = float(state[2])
    if dist < 1e-4 and z - Z_GRASP < 1e-4:
        return np.array([0.0, 0.0, 0.0, 1.0])
    if dist <= SNAP_DIST:
        move = delta  # lands exactly on the target
    else:
        move = GAIN * delta + rng.normal(0.0, STEP_NOISE, size=2)
        move *= min(1.0, MAX_STEP / float(np.linalg.norm(move)))
    remaining = float(np.linalg.norm(target - state[:2] - move))
    z_goal = min(z, Z_GRASP + DESCEND_SLOPE * remaining)
    dz = max(-MAX_DZ, GAIN * (z_goal - z))
    if remaining < 1e-4 and z - Z_GRASP <= SNAP_DIST:
        dz = Z_GRASP - z
    return np.array([move[0], move[1], dz, 0.0])


def make_episode(seed: int, index: int, image_size: int = 64, wrist: bool = False) -> Episode:
    """Episode `index` of the dataset with this seed (pure function of its arguments)."""
    rng = item_rng(seed, ROBOT_STREAM, index)
    objects = sample_objects(rng)
    target_i = int(rng.integers(NUM_OBJECTS))
    target = objects[target_i]
    target_xy = np.array([target.x, target.y])
    while True:
        start = rng.uniform(0.05, 0.95, size=2)
        if np.linalg.norm(start - target_xy) >= MIN_START_DIST:
            break
    state = np.array([start[0], start[1], rng.uniform(0.6, 0.95), 0.0], dtype=np.float32)
    table_rgb = tuple(int(c) for c in np.clip(np.array(TABLE_RGB) + rng.integers(-12, 13, size=3), 0, 255))
    instruction = str(rng.choice(TEMPLATES)).format(c=target.colour, n=target.noun(rng))

    states, actions = [], []
    closed_steps = 0
    while closed_steps <= HOLD_STEPS:
        if len(actions) >= MAX_LENGTH:
            raise RuntimeError(f"synth episode {index} (seed {seed}) did not finish in {MAX_LENGTH} steps")
        action = expert_action(state, target_xy, rng).astype(np.float32)
        if closed_steps:
            action[:3] = 0.0
            action[3] = 1.0
        closed_steps += int(action[3] > 0.5)
        states.append(state)
        actions.append(action)
        state = np.concatenate([state[:3] + action[:3], action[3:]]).astype(np.float32)

    static_view = (0.5, 0.5, 1.0)
    scene = draw_scene(objects, image_size, static_view, table_rgb)
    frames = {"rgb_static": [draw_gripper(scene, s, static_view) for s in states]}
    if wrist:
        frames["rgb_wrist"] = [render(objects, s, image_size, wrist_view(s), table_rgb) for s in states]
    meta = {
        "task": "reach_and_grasp",
        "objects": [o.as_meta() for o in objects],
        "target_index": target_i,
        "target_colour": target.colour,
        "target_xy": [target.x, target.y],
        "z_grasp": Z_GRASP,
        "seed": seed,
        "index": index,
    }
    return Episode(f"ep{index:06d}", instruction, np.stack(actions), np.stack(states), frames, meta)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def describe(objects: list[SceneObject]) -> str:
    """'a red block, a green disc and a blue block on a table'."""
    names = [f"{_article(o.colour)} {o.colour} {NOUNS[o.shape][0]}" for o in objects]
    return f"{', '.join(names[:-1])} and {names[-1]} on a table"


def _question(kind: str, objects: list[SceneObject], ee: np.ndarray, rng: np.random.Generator) -> tuple[str, str]:
    if kind == "caption":
        q = str(rng.choice(["Describe the image.", "What is on the table?", "Describe the scene briefly."]))
        return q, describe(objects).capitalize() + "."
    if kind == "closest":
        closest = objects[int(np.argmin([np.hypot(o.x - ee[0], o.y - ee[1]) for o in objects]))]
        return "What colour is the object closest to the gripper?", closest.colour.capitalize() + "."
    if kind == "exists":
        colour = str(rng.choice(list(PALETTE)))
        present = [o for o in objects if o.colour == colour]
        noun = present[0].noun(rng) if present else str(rng.choice(["block", "disc", "object"]))
        return f"Is there {_article(colour)} {colour} {noun}?", "Yes." if present else "No."
    obj = objects[int(rng.integers(len(objects)))]
    if kind == "where":
        rows, cols = ("top", "middle", "bottom"), ("left", "centre", "right")
        row, col = rows[min(int(obj.y * 3), 2)], cols[min(int(obj.x * 3), 2)]
        place = "the centre" if (row, col) == ("middle", "centre") else f"the {row} {col}"
        return f"Where is the {obj.colour} {obj.noun(rng)}?", f"In {place} of the table."
    shape = "A square block." if obj.shape == "square" else "A round disc."
    return f"What shape is the {obj.colour} object?", shape


QUESTION_KINDS = ("caption", "closest", "exists", "where", "shape")


def make_vl_sample(seed: int, index: int, image_size: int = 64) -> VLSample:
    """VL sample `index`: a scene image and a 1-2 turn LLaVA-style conversation about it."""
    rng = item_rng(seed, VL_STREAM, index)
    objects = sample_objects(rng)
    while True:  # keep "closest to the gripper" unambiguous
        ee = np.array([*rng.uniform(0.05, 0.95, size=2), rng.uniform(0.1, 0.9), 0.0])
        d = np.sort([np.hypot(o.x - ee[0], o.y - ee[1]) for o in objects])
        if d[1] - d[0] >= 0.05:
            break
    image = render(objects, ee, image_size)
    kinds = rng.choice(QUESTION_KINDS, size=int(rng.integers(1, 3)), replace=False)
    conversations = []
    for turn, kind in enumerate(kinds):
        q, a = _question(str(kind), objects, ee, rng)
        conversations.append({"from": "human", "value": ("<image>\n" if turn == 0 else "") + q})
        conversations.append({"from": "gpt", "value": a})
    return VLSample(f"vl{index:06d}", image, conversations)


def _encoded_episode(index: int, seed: int, image_size: int, wrist: bool, image_ext: str) -> dict:
    return encode_episode(make_episode(seed, index, image_size, wrist), image_ext)


def _encoded_vl(index: int, seed: int, image_size: int, image_ext: str) -> dict:
    return encode_vl(make_vl_sample(seed, index, image_size), image_ext)


def _generate(fn: Callable[[int], dict], n: int, pool: multiprocessing.pool.Pool | None) -> Iterator[dict]:
    """Samples 0..n-1 in order, so the shards are identical for any worker count."""
    if pool is None:
        return map(fn, range(n))
    return pool.imap(fn, range(n), chunksize=4)


def synth(
    out_dir: str | Path,
    episodes: int = 400,
    vl_samples: int = 200,
    image_size: int = 64,
    seed: int = 0,
    episodes_per_shard: int = 50,
    vl_per_shard: int = 50,
    workers: int = 1,
    wrist: bool = False,
    image_ext: str = "png",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Manifest]:
    """Write `out_dir/robot` and `out_dir/vl` datasets (a count of 0 skips one); returns manifests by kind.

    PNG is the default image format: these flat-colour frames are smaller as PNG than
    as JPEG, and lossless, so tests can compare pixels exactly.
    """
    if image_size < 16:
        raise ValueError(f"image_size {image_size} is too small to draw the scene; use 16 or more")
    out = Path(out_dir)
    common = {"image_ext": image_ext, "overwrite": overwrite}
    extra = {"seed": seed, "image_size": image_size, "generator": "data_tools.synth"}
    # (writer, per-index sample function, count, progress label). Writers are opened first,
    # so a bad output path fails before any work is done.
    jobs: list[tuple[ShardWriter, Callable[[int], dict], int, str]] = []
    if episodes > 0:
        writer = ShardWriter(
            out / "robot",
            "synth_tabletop",
            "robot",
            max_samples=episodes_per_shard,
            extra=extra,
            spaces=SPACES,
            **common,
        )
        fn = partial(_encoded_episode, seed=seed, image_size=image_size, wrist=wrist, image_ext=image_ext)
        jobs.append((writer, fn, episodes, "episodes"))
    if vl_samples > 0:
        writer = ShardWriter(out / "vl", "synth_vl", "vl", max_samples=vl_per_shard, extra=extra, **common)
        fn = partial(_encoded_vl, seed=seed, image_size=image_size, image_ext=image_ext)
        jobs.append((writer, fn, vl_samples, "VL samples"))

    manifests: dict[str, Manifest] = {}
    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        for writer, fn, n, label in jobs:
            with writer:
                for sample in tqdm(_generate(fn, n, pool), total=n, desc=f"synth {label}", disable=not progress):
                    writer.write_sample(sample)
            manifests[writer.kind] = writer.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return manifests


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools synth`."""
    p = subparsers.add_parser(
        "synth",
        help="generate the synthetic tabletop robot dataset and VL set",
        description="Write OUT_DIR/robot (episodes + stats.json) and OUT_DIR/vl (image + conversation) datasets.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="folder that receives robot/ and vl/")
    p.add_argument("--episodes", type=int, default=400, help="robot episodes (default: %(default)s)")
    p.add_argument("--vl-samples", type=int, default=200, help="VL samples (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="frame height = width in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--episodes-per-shard", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--vl-per-shard", type=int, default=50, help="(default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="generator processes (default: %(default)s)")
    p.add_argument("--wrist", action="store_true", help="also render a 'rgb_wrist' camera")
    p.add_argument("--image-ext", choices=("png", "jpg", "webp"), default="png", help="(default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace datasets already in OUT_DIR")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifests = synth(
        args.out_dir,
        episodes=args.episodes,
        vl_samples=args.vl_samples,
        image_size=args.image_size,
        seed=args.seed,
        episodes_per_shard=args.episodes_per_shard,
        vl_per_shard=args.vl_per_shard,
        workers=args.workers,
        wrist=args.wrist,
        image_ext=args.image_ext,
        overwrite=args.overwrite,
    )
    for kind, m in manifests.items():
        frames = sum(s.frames for s in m.shards)
        extra = f", {frames} frames" if kind == "robot" else ""
        print(f"{Path(args.out_dir) / kind}: {m.num_samples} samples{extra} in {len(m.shards)} shards")
    return 0
