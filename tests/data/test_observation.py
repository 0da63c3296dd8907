"""Observation: the model input built from a Batch, moved between devices, and shape-checked with clear errors."""

from __future__ import annotations

import pytest
import torch

from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation

B, T, L, S = 2, 3, 5, 8


def robot_batch(wrist: bool = True) -> Batch:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (B, T, 3, 16, 16), dtype=torch.uint8, generator=g)
    ids = torch.randint(0, 100, (B, L), generator=g)
    return Batch(
        data_source="robot",
        images=images,
        text_ids=ids,
        text_mask=torch.ones(B, L, dtype=torch.bool),
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        wrist_images=torch.randint(0, 256, (B, T, 3, 8, 8), dtype=torch.uint8, generator=g) if wrist else None,
        state=torch.randn(B, T, S, generator=g),
        action=torch.zeros(B, T, 2, 4),
        action_mask=torch.ones(B, T, 2, dtype=torch.bool),
    )


def test_from_batch_takes_the_model_inputs_only():
    batch = robot_batch()
    obs = batch.observation
    for built in (obs, Observation.from_batch(batch)):
        for name in ("images", "text_ids", "text_mask", "wrist_images", "state"):
            assert getattr(built, name) is getattr(batch, name), name
    assert not hasattr(obs, "action") and not hasattr(obs, "text_labels")
    assert (obs.batch_size, obs.num_frames) == (B, T)
    bare = robot_batch(wrist=False)
    bare.state = None
    assert bare.observation.wrist_images is None and bare.observation.state is None


def test_frames_cuts_every_per_frame_field_and_keeps_the_instruction():
    obs = robot_batch().observation
    cut = obs.frames(1, 3)
    assert cut.num_frames == 2
    assert torch.equal(cut.images, obs.images[:, 1:3]) and torch.equal(cut.state, obs.state[:, 1:3])
    assert torch.equal(cut.wrist_images, obs.wrist_images[:, 1:3])
    assert cut.text_ids is obs.text_ids and cut.text_mask is obs.text_mask


def test_to_moves_every_tensor():
    obs = robot_batch().observation
    moved = obs.to("meta")  # a real device move without an accelerator
    for name in ("images", "text_ids", "text_mask", "wrist_images", "state"):
        value = getattr(moved, name)
        assert value.device.type == "meta" and value.shape == getattr(obs, name).shape, name
        assert value.dtype == getattr(obs, name).dtype, name
    assert obs.images.device.type == "cpu"  # the original is untouched (frozen, not moved in place)
    bare = Observation(obs.images, obs.text_ids, obs.text_mask).to("meta")
    assert bare.wrist_images is None and bare.state is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"images": torch.zeros(B, 3, 16, 16, dtype=torch.uint8)}, r"Observation\.images must be \[B, T, C, H, W\]"),
        ({"text_ids": torch.zeros(B + 1, L, dtype=torch.long)}, r"Observation\.text_ids must be \[B=2, L\]"),
        ({"text_mask": torch.ones(B, L + 1, dtype=torch.bool)}, r"Observation\.text_mask must match text_ids \(2, 5\)"),
        ({"wrist_images": torch.zeros(B, 1, 3, 8, 8)}, r"Observation\.wrist_images must be \[B=2, T=3, C, H, W\]"),
        ({"state": torch.zeros(B, S)}, r"Observation\.state must be \[B=2, T=3, S\], got shape \(2, 8\)"),
        ({"state": torch.zeros(B, T - 1, S)}, r"Observation\.state must be \[B=2, T=3, S\], got shape \(2, 2, 8\)"),
    ],
)
def test_wrong_shapes_name_the_field_and_the_expected_shape(change, message):
    fields = {k: getattr(robot_batch(), k) for k in ("images", "text_ids", "text_mask", "wrist_images", "state")}
    fields.update(change)
    with pytest.raises(ValueError, match=message):
        Observation(**fields)


def test_a_bad_batch_fails_when_its_observation_is_taken():
    batch = robot_batch()
    batch.state = batch.state[:, :1]
    with pytest.raises(ValueError, match=r"Observation\.state"):
        _ = batch.observation
