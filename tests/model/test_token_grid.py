"""Image tokens as a grid: pooling for the LM (`model.image_pool`) and the square-grid check."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import A, N, S, robot_batch, vl_batch
from vla_scale.config.errors import ConfigError
from vla_scale.config.schema import BackboneConfig, ModelConfig, ResamplerConfig
from vla_scale.model import build_model
from vla_scale.model.token_grid import grid_side, pool_grid


def test_pool_grid_averages_each_cell_row_major():
    tokens = torch.arange(16.0).reshape(1, 16, 1)  # grid [[0..3], [4..7], [8..11], [12..15]]
    pooled = pool_grid(tokens, 2)
    torch.testing.assert_close(pooled[0, :, 0], torch.tensor([2.5, 4.5, 10.5, 12.5]))
    assert pool_grid(tokens, 1) is tokens


def test_grids_that_do_not_fit_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="model.image_pool=3 must divide the 4x4"):
        pool_grid(torch.zeros(1, 16, 2), 3)
    with pytest.raises(ValueError, match="model.keypoints needs.*17 tokens"):
        grid_side(17, "model.keypoints")


def _model(tiny_path, image_pool: int):
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path))
    return build_model(ModelConfig(backbone=backbone, image_pool=image_pool), action_dim=A, state_dim=S, chunk_size=N)


def test_image_pool_shortens_every_image_in_the_lm_sequence(tiny_path):
    full, pooled = _model(tiny_path, 1), _model(tiny_path, 2)
    batch = robot_batch(full)
    n_full = full.robot_sequence(batch.observation).attention_mask.sum()
    n_pooled = pooled.robot_sequence(batch.observation).attention_mask.sum()
    per_image = full.adapter.encode_images(batch.observation.images[:1, 0]).shape[1]
    images = batch.observation.images.shape[0] * batch.observation.images.shape[1]
    assert n_full - n_pooled == images * (per_image - per_image // 4)
    assert torch.isfinite(pooled(batch)["loss"]) and torch.isfinite(pooled(vl_batch(pooled))["loss"])
    assert pooled.encode_images(batch.observation.images[:1, 0]).shape[1] == per_image // 4


def test_config_checks_image_pool():
    with pytest.raises(ConfigError, match="model.image_pool"):
        ModelConfig(image_pool=0).validate()
    with pytest.raises(ConfigError, match="model.resampler"):
        ModelConfig(image_pool=2, resampler=ResamplerConfig(enabled=True)).validate()
