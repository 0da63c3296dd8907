"""Image augmentation for robot windows, applied in the DataLoader workers on uint8 frames.

One set of parameters is drawn per camera per window and applied to every frame of that
window, so the motion between frames stays what the robot did rather than what the
augmentation did. Parameters come from an RNG seeded by (run seed, epoch, window key):
the same window gets the same augmentation in a resumed run, and new ones each epoch.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from vla_scale.config.schema import AugmentConfig

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def window_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """Deterministic RNG for one window (crc32, not `hash`, which is salted per process)."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def _shift(frames: np.ndarray, pad: int, rng: np.random.Generator) -> np.ndarray:
    _, h, w, _ = frames.shape
    dy, dx = (int(v) for v in rng.integers(0, 2 * pad + 1, size=2))
    padded = np.pad(frames, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[:, dy : dy + h, dx : dx + w]


def _resized_crop(frames: np.ndarray, scale: list[float], rng: np.random.Generator) -> np.ndarray:
    _, h, w, _ = frames.shape
    area = rng.uniform(scale[0], scale[1]) * h * w
    ratio = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    ch = int(np.clip(round(np.sqrt(area / ratio)), 1, h))
    cw = int(np.clip(round(np.sqrt(area * ratio)), 1, w))
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crops = frames[:, top : top + ch, left : left + cw]
    return np.stack([np.asarray(Image.fromarray(c).resize((w, h), Image.BILINEAR)) for c in crops])


def _colour(frames: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    brightness, contrast, saturation = (1 + rng.uniform(-s, s) for s in (cfg.brightness, cfg.contrast, cfg.saturation))
    x = frames.astype(np.float32) * brightness
    gray_mean = (x @ _LUMA).mean(axis=(1, 2), keepdims=True)[..., None]
    x = (x - gray_mean) * contrast + gray_mean
    gray = (x @ _LUMA)[..., None]
    x = (x - gray) * saturation + gray
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_frames(frames: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    """uint8 `[T, H, W, 3]` → augmented `[T, H, W, 3]`, one parameter draw for all T frames."""
    if not cfg.enabled:
        return frames
    if cfg.crop == "shift" and cfg.shift_px > 0:
        frames = _shift(frames, cfg.shift_px, rng)
    elif cfg.crop == "resized_crop":
        frames = _resized_crop(frames, cfg.crop_scale, rng)
    if cfg.brightness or cfg.contrast or cfg.saturation:
        frames = _colour(frames, cfg, rng)
    return np.ascontiguousarray(frames)
