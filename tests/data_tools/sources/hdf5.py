"""Toy source dataset for the converter tests and the converted-formats training test.

robomimic / LIBERO image files and ALOHA episode files (raw or JPEG-compressed rows).
"""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
from PIL import Image

SIZE = 32
DEMOS = {0: 4, 2: 3, 10: 5}  # robomimic demo number → length; demo_10 must come after demo_2
LIBERO_STATE = ("ee_pos", "ee_ori", "gripper_states")


def frame(ep: int, t: int, cam: int) -> np.ndarray:
    """Flat 16x16 blocks, different per episode, step and camera (JPEG-friendly)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    base = (ep * 37 + t * 23 + cam * 90) % 200
    for b, (r, c) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        img[r : r + 16, c : c + 16] = ((base + 50 * b) % 256, (255 - base - 30 * b) % 256, (40 + 60 * b) % 256)
    return img


def frames(ep: int, length: int, cam: int) -> np.ndarray:
    return np.stack([frame(ep, t, cam) for t in range(length)])


def series(ep: int, length: int, dim: int, scale: float) -> np.ndarray:
    t = np.arange(length, dtype=np.float32)[:, None]
    return (ep * 10 + t * scale + np.arange(dim, dtype=np.float32)[None] * 0.25).astype(np.float32)


def jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


# -- fixtures -------------------------------------------------------------------------------


def make_robomimic(
    path: Path, names: tuple[str, str] = ("agentview_image", "robot0_eye_in_hand_image"), **attrs
) -> Path:
    """A robomimic image file: demos 0, 2, 10, obs images + low-dim keys, actions, a train mask."""
    low = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos") if "image" in names[0] else LIBERO_STATE
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        for k, v in attrs.items():
            data.attrs[k] = v
        for n, length in DEMOS.items():
            demo = data.create_group(f"demo_{n}")
            demo.attrs["num_samples"] = length
            for cam, name in enumerate(names):
                demo[f"obs/{name}"] = frames(n, length, cam)
            for i, (key, dim) in enumerate(zip(low, (3, 4, 2), strict=True)):
                demo[f"obs/{key}"] = series(n, length, dim, 1.0 + i).astype(np.float64)
            demo["obs/object"] = series(n, length, 5, -1.0)
            demo["actions"] = series(n, length, 7, 0.5)
        f["mask/train"] = np.array([b"demo_0", b"demo_10"])
    return path


def robomimic_state(n: int, length: int) -> np.ndarray:
    return np.concatenate([series(n, length, dim, 1.0 + i) for i, dim in enumerate((3, 4, 2))], axis=1)


ALOHA_LENGTHS = (3, 4)


def aloha_action(ep: int, length: int, binary_grippers: bool = False) -> np.ndarray:
    action = series(ep, length, 14, 0.3)
    if binary_grippers:
        t = np.arange(length)
        action[:, 6], action[:, 13] = t % 2, (t + ep) // 2 % 2
    return action


ALOHA_CAMS = ("cam_high", "cam_left_wrist", "cam_right_wrist")


def make_aloha(folder: Path, compress: bool, binary_grippers: bool = False) -> Path:
    """episode_0/1.hdf5; compressed: cam_high as zero-padded JPEG rows, cam_left_wrist as variable-length rows.
    `binary_grippers`: action dims 6 and 13 (each arm's gripper) are 0/1 open/close commands."""
    folder.mkdir(parents=True)
    for ep, length in enumerate(ALOHA_LENGTHS):
        with h5py.File(folder / f"episode_{ep}.hdf5", "w") as f:
            f.attrs["sim"] = False
            f.attrs["compress"] = compress
            for cam, name in enumerate(ALOHA_CAMS):
                imgs = frames(ep, length, cam)
                if not compress:
                    f[f"observations/images/{name}"] = imgs
                    continue
                encoded = [np.frombuffer(jpeg(img), np.uint8) for img in imgs]
                if cam == 1:
                    ds = f.create_dataset(f"observations/images/{name}", (length,), dtype=h5py.vlen_dtype(np.uint8))
                    for t, row in enumerate(encoded):
                        ds[t] = row
                else:
                    padded = np.zeros((length, max(len(e) for e in encoded) + 64), np.uint8)
                    for t, row in enumerate(encoded):
                        padded[t, : len(row)] = row
                    f[f"observations/images/{name}"] = padded
            f["observations/qpos"] = series(ep, length, 14, 0.1)
            f["observations/qvel"] = series(ep, length, 14, 0.2)
            f["action"] = aloha_action(ep, length, binary_grippers)
    return folder
