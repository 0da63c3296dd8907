"""PaliGemma 1/2 adapter: tiny round trip, equality with PaliGemma's own forward, causality, RoboVLM training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Gemma2Model, GemmaModel, SiglipVisionModel

from vla_scale.config.schema import BackboneConfig, ModelConfig, TinyBackboneConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import (
    BackboneAdapter,
    PaliGemma2Adapter,
    PaliGemmaAdapter,
    build_tiny_backbone,
    load_backbone,
)

TINY = TinyBackboneConfig()  # as in conftest: hidden 64, 2 layers, 64x64 images in 16x16 patches
FAMILIES = {"paligemma": ("gemma", GemmaModel), "paligemma2": ("gemma2", Gemma2Model)}
N_IMAGE = (TINY.image_size // TINY.patch_size) ** 2


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> tuple[str, Path, BackboneAdapter]:
    family = request.param
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    return family, path, build_tiny_backbone(family, TINY, path, seed=0)


def images(b: int, g: torch.Generator, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def test_round_trip_is_identical_and_keeps_the_text_family(built, rng):
    family, path, adapter = built
    loaded = load_backbone(family, str(path))
    assert type(loaded) is {"paligemma": PaliGemmaAdapter, "paligemma2": PaliGemma2Adapter}[family]
    assert loaded.text_family == FAMILIES[family][0]
    assert load_backbone("paligemma", str(path)).text_family == FAMILIES[family][0]  # the checkpoint decides
    assert loaded.model.config.text_config.use_bidirectional_attention is False
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = torch.randint(0, 500, (2, 9), generator=rng), torch.ones(2, 9, dtype=torch.bool)
    pixels = images(2, rng)
    with torch.no_grad():
        assert torch.equal(adapter.encode_images(pixels), loaded.encode_images(pixels))
        out_a = adapter.lm_forward(adapter.embed_tokens(ids), mask)
        out_b = loaded.lm_forward(loaded.embed_tokens(ids), mask)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    text = "pick up the red block and put it in the blue bowl"
    assert adapter.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids
    assert loaded.tokenizer(text).input_ids[0] == loaded.bos_id  # Gemma style: BOS prepended, no EOS


def test_modules_and_shapes(built, rng):
    family, _, adapter = built
    assert adapter.decoder_layers is adapter.model.model.language_model.layers
    assert isinstance(adapter.model.model.language_model, FAMILIES[family][1]) and len(adapter.decoder_layers) == 2
    assert isinstance(adapter.vision_module, SiglipVisionModel) and adapter.projector.linear.out_features == 64
    features = adapter.encode_images(images(3, rng, size=48))  # resized to the tower's 64x64
    assert features.shape == (3, N_IMAGE, adapter.hidden_size) and torch.isfinite(features).all()
    embeds = adapter.embed_tokens(torch.randint(0, 500, (2, 5), generator=rng))
    hidden, logits, _ = adapter.lm_forward(embeds, torch.ones(2, 5, dtype=torch.bool))
    assert hidden.shape == (2, 5, 64) and logits.shape == (2, 5, len(adapter.tokenizer))
    assert adapter.lm_forward(embeds, torch.ones(2, 5, dtype=torch.bool), return_logits=False)[1] is None


def test_lm_forward_equals_paligemmas_own_forward(built, rng):
    """Image features unscaled + scaled text embeddings + 1-indexed positions = what PaliGemma computes itself."""
    _, _, adapter = built
    tok = adapter.tokenizer
    text = tok("open the drawer", add_special_tokens=False).input_ids
    image_id = adapter.model.config.image_token_id
    ids = torch.tensor([[image_id] * N_IMAGE + [tok.bos_token_id] + text])  # the PaliGemma processor's layout
    pixels = images(1, rng)
    with torch.no_grad():
        ref = adapter.model(input_ids=ids, pixel_values=adapter.preprocess_images(pixels), attention_mask=ids * 0 + 1)
        embeds = torch.cat([adapter.encode_images(pixels), adapter.embed_tokens(ids[:, N_IMAGE:])], dim=1)
        _, logits, _ = adapter.lm_forward(embeds, torch.ones(ids.shape, dtype=torch.bool))
    torch.testing.assert_close(logits, ref.logits, atol=1e-5, rtol=1e-5)


def test_lm_is_causal_and_the_kv_cache_matches(built, rng):
    """PaliGemma's config would make Gemma bidirectional under an all-ones mask; the adapter forces it causal."""
    _, _, adapter = built
    embeds = adapter.embed_tokens(torch.randint(0, 500, (2, 7), generator=rng))
    mask = torch.ones(2, 7, dtype=torch.bool)
    changed = embeds.clone()
    changed[:, -1] += 1.0
    with torch.no_grad():
        hidden, logits, _ = adapter.lm_forward(embeds, mask)
        assert torch.equal(adapter.lm_forward(changed, mask)[0][:, :-1], hidden[:, :-1])
        h1, _, cache = adapter.lm_forward(embeds[:, :6], mask[:, :6], use_cache=True)
        _, l2, _ = adapter.lm_forward(embeds[:, 6:], mask, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(h1, hidden[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)


def small_batches(model: RoboVLM, g: torch.Generator) -> list[Batch]:
    """A robot batch (window 2, chunk 3, 7-dim actions, state) and a VL batch with labels on the answer."""
    tok = model.adapter.tokenizer
    enc = tok(["pick up the red block", "open the drawer"], add_special_tokens=False, padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask.bool()
    action = torch.randn(2, 2, 3, 7, generator=g)
    action[..., -1] = (action[..., -1] > 0).float()
    robot = Batch(
        data_source="robot",
        images=torch.randint(0, 256, (2, 2, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.randn(2, 2, 8, generator=g),
        action=action,
        action_mask=torch.ones(2, 2, 3, dtype=torch.bool),
    )
    vl = Batch(
        data_source="vl",
        images=torch.randint(0, 256, (2, 1, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.where(mask, ids, IGNORE_INDEX),
    )
    return [robot, vl]


def test_robovlm_trains_with_every_parameter_getting_a_gradient(built, rng):
    family, path, _ = built
    torch.manual_seed(0)
    backbone = BackboneConfig(family=family, pretrained=str(path), gradient_checkpointing=True)
    model = build_model(ModelConfig(backbone=backbone, use_state=True), 7, 8, chunk_size=3).train()
    for batch in small_batches(model, rng):
        model.zero_grad(set_to_none=True)
        out = model(batch)
        assert torch.isfinite(out["loss"]) and out["loss"].item() > 0, batch.data_source
        out["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], batch.data_source
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.adapter.projector.linear.weight.grad.abs().sum() > 0
