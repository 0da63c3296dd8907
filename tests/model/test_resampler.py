"""Perceiver resampler: shapes, gradients, RoboVLM with it on (continuous, discrete), Qwen 1D positions for latents."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import discrete_batch, robot_batch, vl_batch
from vla_scale.config.schema import BackboneConfig, ModelConfig, ResamplerConfig, TinyBackboneConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import build_tiny_backbone
from vla_scale.model.resampler import PerceiverResampler

K = 3  # latents per image: fewer than the tower's 16 (LLaVA) and not a multiple of Qwen's 4 (no grid to fake)
N_IMAGE = 16
RESAMPLER = ResamplerConfig(enabled=True, num_latents=K, depth=2, heads=2, dim_head=16, ff_mult=2)


def make(path, family: str = "llava", resampler: bool = True, action_dim: int = 7, chunk: int = 3, **kw) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family=family, pretrained=str(path), gradient_checkpointing=False)
    cfg = ModelConfig(backbone=backbone, resampler=RESAMPLER if resampler else ResamplerConfig(), **kw)
    return build_model(cfg, action_dim=action_dim, state_dim=8, chunk_size=chunk).train()


def missing_grads(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_any_token_count_becomes_num_latents_per_image_and_everything_trains():
    torch.manual_seed(0)
    resampler = PerceiverResampler(dim=32, num_latents=5, depth=2, heads=2, dim_head=8)
    for n in (1, 16, 50):
        assert resampler(torch.randn(3, n, 32)).shape == (3, 5, 32)
    x = torch.randn(3, 16, 32, requires_grad=True)
    out = resampler(x)
    # Each row is one image, resampled on its own.
    torch.testing.assert_close(out[1:2], resampler(x[1:2]), atol=1e-5, rtol=1e-5)
    out.square().mean().backward()
    assert x.grad.abs().sum() > 0
    assert [n for n, p in resampler.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
    with pytest.raises(ValueError, match=r"model\.resampler\.num_latents must be >= 1"):
        PerceiverResampler(dim=32, num_latents=0)


def test_continuous_robovlm_with_resampler_shortens_the_sequence_and_trains(tiny_path):
    model, plain = make(tiny_path, use_state=True), make(tiny_path, resampler=False, use_state=True)
    batch = robot_batch(model)
    batch.wrist_images = batch.images.flip(-1)
    assert model.encode_images(batch.images[:, 0]).shape == (2, K, model.adapter.hidden_size)
    with torch.no_grad():
        short = model.robot_sequence(batch.observation, n_action=2, action_token=model.action_token, append_eos=True)
        long = plain.robot_sequence(batch.observation, n_action=2, action_token=plain.action_token, append_eos=True)
    assert long.embeds.shape[1] - short.embeds.shape[1] == 2 * (N_IMAGE - K)  # static + wrist image
    out = model(batch)
    assert torch.isfinite(out["loss"]) and out["num_tokens"] < plain(batch)["num_tokens"]
    out["loss"].backward()
    assert missing_grads(model) == []
    assert all(p.grad.abs().sum() > 0 for p in model.resampler.parameters())
    # VL batches resample their image too: the resampler trains there and needs no zero-touch.
    model.zero_grad(set_to_none=True)
    vl = model(vl_batch(model))
    vl["loss"].backward()
    assert missing_grads(model) == []
    assert all(p.grad.abs().sum() > 0 for p in model.resampler.parameters())
    arm, gripper = model.predict_action(batch.observation)
    assert arm.shape == (2, 2, 3, 6) and gripper.shape == (2, 2, 3, 1)


def test_discrete_robovlm_with_resampler_trains_and_decodes(tiny_path):
    model = make(tiny_path, action_space="discrete", action_dim=4, chunk=2)
    batch = discrete_batch(model)
    out = model(batch)
    assert torch.isfinite(out["loss_action_ce"])
    out["loss"].backward()
    assert missing_grads(model) == [] and model.resampler.latents.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():  # spread the action rows so greedy ids depend on the context
        model.adapter.lm_head.weight[-64:] *= 30
    cached = model.decode_action_ids(batch.observation)
    uncached = model.decode_action_ids(batch.observation, use_cache=False)
    assert cached.shape == (2, 1, 2, 4) and torch.equal(cached, uncached)


@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_qwen2_vl")
    build_tiny_backbone("qwen2_vl", TinyBackboneConfig(), path, seed=0)
    return path


def test_qwen_gives_resampled_images_1d_positions(tiny_qwen, rng):
    """Latents have no patch grid, so Qwen's multimodal RoPE must not pretend one: image spans count up like text."""
    model = make(tiny_qwen, family="qwen2_vl", use_state=True)
    assert model.adapter.images_resampled and not make(tiny_qwen, "qwen2_vl", resampler=False).adapter.images_resampled
    tok = model.adapter.tokenizer
    enc = tok(["pick up the red block", "open the drawer"], padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask.bool()
    action = torch.randn(2, 2, 3, 7, generator=rng)
    action[..., -1] = (action[..., -1] > 0).float()
    batch = Batch(
        data_source="robot",
        images=torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8, generator=rng),
        wrist_images=torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8, generator=rng),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.randn(2, 2, 8, generator=rng),
        action=action,
        action_mask=torch.ones(2, 2, 3, dtype=torch.bool),
    )
    with torch.no_grad():
        fused = model.robot_sequence(batch.observation, n_action=1, action_token=model.action_token, append_eos=True)
        positions = model.adapter.position_ids(fused.embeds, fused.attention_mask)
        expected = torch.where(fused.attention_mask, fused.attention_mask.long().cumsum(1) - 1, 0)
        assert torch.equal(positions, expected.expand(3, -1, -1))
        # A KV-cache step after a prefix with resampled images continues those positions.
        _, logits, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask)
        cut = fused.embeds.shape[1] - 3
        _, _, cache = model.adapter.lm_forward(fused.embeds[:, :cut], fused.attention_mask[:, :cut], use_cache=True)
        _, tail, _ = model.adapter.lm_forward(
            fused.embeds[:, cut:], fused.attention_mask, past_key_values=cache, use_cache=True
        )
    real = fused.attention_mask[:, cut:]  # right padding: compare the rows' real tail tokens
    assert real.any()
    torch.testing.assert_close(tail[real], logits[:, cut:][real], atol=1e-5, rtol=1e-5)
    out = model(batch)
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert missing_grads(model) == []
