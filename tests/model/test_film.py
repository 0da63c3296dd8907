"""FiLM conditioning (`model.film`): identity when fresh, instruction-dependent image tokens once trained."""

from __future__ import annotations

import torch

from tests.model.batches import A, N, S, robot_batch, vl_batch
from vla_scale.config.schema import BackboneConfig, ModelConfig
from vla_scale.model import build_model
from vla_scale.model.film import InstructionFiLM


def _model(tiny_path, film: bool):
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=BackboneConfig(family="llava", pretrained=str(tiny_path)), latent_num=1, film=film)
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).eval()


def test_fresh_film_is_the_identity(tiny_path):
    plain, filmed = _model(tiny_path, film=False), _model(tiny_path, film=True)
    batch = robot_batch(plain)
    torch.testing.assert_close(plain(batch)["loss"], filmed(batch)["loss"])


def test_film_makes_the_prediction_depend_on_the_instruction_through_the_image_tokens(tiny_path):
    model = _model(tiny_path, film=True)
    batch = robot_batch(model, texts=["touch the red block", "touch the red block"])
    other = robot_batch(model, texts=["touch the blue block", "touch the blue block"])
    before = model.film(torch.ones(1, 3, model.adapter.hidden_size), torch.randn(1, model.adapter.hidden_size))
    assert torch.equal(before, torch.ones_like(before))  # zero-initialised: no modulation yet
    with torch.no_grad():
        model.film.proj.weight.normal_(std=0.5)
    seq_a = model.robot_sequence(batch.observation, n_action=1, action_token=model.action_token)
    seq_b = model.robot_sequence(other.observation, n_action=1, action_token=model.action_token)
    assert seq_a.embeds.shape == seq_b.embeds.shape
    assert not torch.allclose(seq_a.embeds, seq_b.embeds)


def test_film_gets_gradients_on_robot_batches_and_zero_touch_on_vl_batches(tiny_path):
    model = _model(tiny_path, film=True).train()
    model(robot_batch(model))["loss"].backward()
    assert model.film.proj.weight.grad is not None and model.film.proj.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(vl_batch(model))["loss"].backward()
    assert model.film.proj.weight.grad is not None
    assert model.film.proj.weight.grad.abs().sum() == 0


def test_instruction_embedding_ignores_padding():
    embeds = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [100.0, 100.0]]])
    keep = torch.tensor([[True, True, False]])
    assert torch.equal(InstructionFiLM.instruction_embedding(embeds, keep), torch.tensor([[2.0, 2.0]]))
