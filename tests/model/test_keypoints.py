"""Spatial keypoints (`model.keypoints`): positions read off the image-token grid, fed to the action head."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import A, N, S, robot_batch, vl_batch
from vla_scale.config.errors import ConfigError
from vla_scale.config.schema import BackboneConfig, ModelConfig, ResamplerConfig
from vla_scale.config.schema_model import FlowConfig
from vla_scale.model import build_model
from vla_scale.model.keypoints import SpatialKeypoints, keypoint_coordinates


def _model(tiny_path, keypoints: int, film: bool = False, history_type: str = "post", space: str = "continuous"):
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path))
    cfg = ModelConfig(
        backbone=backbone, latent_num=2, film=film, keypoints=keypoints, history_type=history_type, action_space=space
    )
    cfg.validate()
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).eval()


def test_a_peaked_score_map_gives_the_peak_position():
    grid = 4
    scores = torch.full((2, grid * grid, 1), -50.0)
    scores[0, 1 * grid + 3, 0] = 50.0  # row 1, column 3
    scores[1, 3 * grid + 0, 0] = 50.0  # row 3, column 0
    coords = keypoint_coordinates(scores, grid)
    axis = torch.linspace(-1, 1, grid)
    torch.testing.assert_close(coords[0, 0], torch.stack([axis[3], axis[1]]))
    torch.testing.assert_close(coords[1, 0], torch.stack([axis[0], axis[3]]))


def test_uniform_scores_give_the_image_centre():
    coords = keypoint_coordinates(torch.zeros(1, 9, 3), 3)
    torch.testing.assert_close(coords, torch.zeros(1, 3, 2))


def test_tokens_that_are_not_a_square_grid_are_refused_with_what_to_change():
    with pytest.raises(ValueError, match="square grid.*turn model.keypoints off"):
        SpatialKeypoints(8, 2)(torch.randn(1, 10, 8))


@pytest.mark.parametrize("history_type", ["post", "video"])
def test_fresh_keypoints_leave_the_policy_unchanged(tiny_path, history_type):
    plain = _model(tiny_path, 0, history_type=history_type)
    with_kp = _model(tiny_path, 8, history_type=history_type)
    batch = robot_batch(plain)
    torch.testing.assert_close(plain(batch)["loss"], with_kp(batch)["loss"])


def test_keypoints_learn_on_robot_batches_and_feed_the_action_head(tiny_path):
    model = _model(tiny_path, 8, film=True).train()
    model(robot_batch(model))["loss"].backward()
    assert model.keypoints.proj.weight.grad.abs().sum() > 0  # the projection learns first (zero-initialised)
    with torch.no_grad():
        model.keypoints.proj.weight.normal_(std=0.5)
    model.zero_grad(set_to_none=True)
    model(robot_batch(model))["loss"].backward()
    assert model.keypoints.score[0].weight.grad.abs().sum() > 0  # then the score maps
    batch = robot_batch(model.eval())
    with_keypoints, _ = model.predict_action(batch.observation)
    with torch.no_grad():
        model.keypoints.proj.weight.zero_()
    without, _ = model.predict_action(batch.observation)
    assert not torch.allclose(with_keypoints, without)


def test_keypoints_stay_in_the_graph_of_vl_batches_with_zero_gradient(tiny_path):
    model = _model(tiny_path, 4).train()
    model(vl_batch(model))["loss"].backward()
    grad = model.keypoints.score[0].weight.grad
    assert grad is not None and grad.abs().sum() == 0


def test_the_flow_expert_reads_the_keypoints_and_they_learn_from_its_loss(tiny_path):
    model = _model(tiny_path, 8, film=True, space="flow").train()
    model(robot_batch(model))["loss"].backward()
    assert model.keypoints.proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        model.keypoints.proj.weight.normal_(std=0.5)
    model.zero_grad(set_to_none=True)
    model(robot_batch(model))["loss"].backward()
    assert model.keypoints.score[0].weight.grad.abs().sum() > 0  # the maps learn once the projection passes them on
    model.eval()
    batch = robot_batch(model)
    noise = torch.Generator().manual_seed(0)
    with_keypoints, _ = model.predict_action(batch.observation, noise)
    with torch.no_grad():
        model.keypoints.proj.weight.zero_()
    without, _ = model.predict_action(batch.observation, torch.Generator().manual_seed(0))
    assert not torch.allclose(with_keypoints, without)


def test_config_refuses_keypoints_with_a_resampler_or_discrete_actions():
    with pytest.raises(ConfigError, match="model.resampler"):
        ModelConfig(keypoints=4, resampler=ResamplerConfig(enabled=True)).validate()
    with pytest.raises(ConfigError, match="model.keypoints: 0"):
        ModelConfig(keypoints=4, action_space="discrete").validate()
    with pytest.raises(ConfigError, match="stop_gradient_to_vlm: false"):  # the keypoints would never learn
        ModelConfig(keypoints=4, action_space="flow", flow=FlowConfig(stop_gradient_to_vlm=True)).validate()
    ModelConfig(BackboneConfig(family="llava", pretrained="x"), keypoints=4, action_space="flow").validate()
    with pytest.raises(ConfigError, match="model.keypoints"):
        ModelConfig(keypoints=-1).validate()


def test_fresh_maps_are_sharp_enough_to_find_one_distinct_token():
    # A flat table with one block: without the normalisation and temperature every map stayed uniform (keypoints
    # at the centre, no gradient to move them). Fresh maps must already single out the odd token.
    torch.manual_seed(0)
    grid, hidden = 16, 32
    tokens = torch.randn(1, 1, hidden).expand(1, grid * grid, hidden).clone()
    row, col = 2, 13
    tokens[0, row * grid + col] = torch.randn(hidden)
    coords = SpatialKeypoints(hidden, 16).coordinates(tokens)[0]  # [K, 2]
    target = torch.tensor([-1 + 2 * col / (grid - 1), -1 + 2 * row / (grid - 1)])
    assert (coords - target).norm(dim=-1).min() < 2 / (grid - 1)
