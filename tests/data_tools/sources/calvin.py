"""Toy source dataset for the converter tests and the converted-formats training test.

CALVIN: one npz per frame plus lang_annotations/auto_lang_ann.npy (segments may overlap).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIRST, LAST = 100, 111  # frame ids on disk
SEGMENTS = [(100, 104), (103, 108), (109, 111)]  # inclusive ends; the first two overlap
TEXTS = ["open the drawer", "push the red block left", "turn on the lamp"]
TASKS = ["open_drawer", "push_red_block_left", "turn_on_lamp"]


def image(frame: int, size: int, cam: int) -> np.ndarray:
    rng = np.random.default_rng([frame, cam])
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def vec(frame: int, dim: int, scale: float) -> np.ndarray:
    return (frame * scale + np.arange(dim) * 0.5).astype(np.float64)


def with_gripper(v: np.ndarray, frame: int) -> np.ndarray:
    """CALVIN's last action / robot_obs entry is the gripper command: +1 open, -1 close."""
    v = v.copy()
    v[-1] = 1.0 if frame % 3 else -1.0
    return v


def make_calvin(root: Path) -> Path:
    (root / "lang_annotations").mkdir(parents=True)
    for i in range(FIRST, LAST + 1):
        np.savez(
            root / f"episode_{i:07d}.npz",
            rgb_static=image(i, 20, 0),
            rgb_gripper=image(i, 8, 1),
            robot_obs=with_gripper(vec(i, 15, 1.0), i),
            scene_obs=vec(i, 24, -1.0),
            rel_actions=with_gripper(vec(i, 7, 0.01), i),
            actions=with_gripper(vec(i, 7, 2.0), i),
        )
    ann = {
        "info": {"episodes": [], "indx": SEGMENTS},
        "language": {"ann": TEXTS, "task": TASKS, "emb": np.zeros((3, 1, 4), np.float32)},
    }
    np.save(root / "lang_annotations" / "auto_lang_ann.npy", ann, allow_pickle=True)
    return root
