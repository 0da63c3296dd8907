"""Augmentation: one draw per camera per window, applied identically to the window's frames."""

import numpy as np
import pytest

from tests.data.toy_shards import write_robot
from vla_scale.config import ConfigError, load_config
from vla_scale.config.schema import AugmentConfig
from vla_scale.data.augment import augment_frames, window_rng
from vla_scale.data.reader import BadSamples, Reader
from vla_scale.data.stream import SourceStream


def textured(t: int = 3, size: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    return np.stack([frame] * t)


@pytest.mark.parametrize("crop", ["shift", "resized_crop", "none"])
def test_same_parameters_for_every_frame_of_a_window(crop):
    cfg = AugmentConfig(enabled=True, crop=crop, shift_px=3)
    frames = textured()
    out = augment_frames(frames, cfg, window_rng(0, 0, "shard:ep/0"))
    assert out.shape == frames.shape and out.dtype == np.uint8
    assert not np.array_equal(out[0], frames[0])
    assert all(np.array_equal(out[0], out[t]) for t in range(1, len(out)))


def test_shift_moves_content_by_whole_pixels():
    cfg = AugmentConfig(enabled=True, crop="shift", shift_px=2, brightness=0, contrast=0, saturation=0)
    frames = textured(1, 16)
    out = augment_frames(frames, cfg, window_rng(1, 0, "k"))
    padded = np.pad(frames, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="edge")
    offsets = [
        (dy, dx) for dy in range(5) for dx in range(5) if np.array_equal(padded[0, dy : dy + 16, dx : dx + 16], out[0])
    ]
    assert offsets, "output must be the frame shifted by an integer offset within shift_px"


def test_deterministic_per_window_and_epoch_and_different_across_cameras():
    cfg = AugmentConfig(enabled=True, crop="resized_crop")
    frames = textured()
    a = augment_frames(frames, cfg, window_rng(0, 0, "k"))
    assert np.array_equal(a, augment_frames(frames, cfg, window_rng(0, 0, "k")))
    assert not np.array_equal(a, augment_frames(frames, cfg, window_rng(0, 1, "k")))
    rng = window_rng(0, 0, "k")
    static, wrist = augment_frames(frames, cfg, rng), augment_frames(frames, cfg, rng)
    assert not np.array_equal(static, wrist)


def test_disabled_is_identity_and_stream_applies_it(tmp_path):
    frames = textured()
    assert augment_frames(frames, AugmentConfig(enabled=False), window_rng(0, 0, "k")) is frames
    write_robot(tmp_path, [4, 4], per_shard=2)

    def windows(cfg):
        s = SourceStream(tmp_path, Reader(), 0, 1, False, 2, 1, BadSamples(), augment=cfg)
        return list(s._epoch_items())

    plain, augmented = windows(None), windows(AugmentConfig(enabled=True, crop="none", brightness=0.5))
    assert len(plain) == len(augmented)
    assert any(not np.array_equal(p.images, a.images) for p, a in zip(plain, augmented, strict=True))
    for p, a in zip(plain, augmented, strict=True):
        np.testing.assert_array_equal(p.action, a.action)


def test_bad_augment_config_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.augment\.crop_scale"):
        load_config(
            None, ["data.augment.crop_scale=[0.5, 1.5]", "data.sources=[{path: x}]", "model.backbone.pretrained=x"]
        )
    with pytest.raises(ConfigError, match=r"data\.augment\.crop: 'random' is not one of"):
        load_config(None, ["data.augment.crop=random"])
