"""LLaVA adapter: the tiny checkpoint round trip, the registry, image encoding, LM forward and KV cache."""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from vla_scale.config.schema import BackboneConfig, TinyBackboneConfig
from vla_scale.model.backbones import (
    BackboneAdapter,
    LlavaAdapter,
    available_backbones,
    ensure_tiny_backbone,
    get_backbone_class,
    load_backbone,
    register_backbone,
)


def test_tiny_checkpoint_round_trip_is_identical(tiny_built, rng):
    path, built = tiny_built
    for name in ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"]:
        assert (path / name).is_file(), name
    loaded = load_backbone("llava", str(path))
    assert isinstance(loaded, LlavaAdapter)
    assert loaded.model.dtype == torch.float32
    built_state, loaded_state = built.model.state_dict(), loaded.model.state_dict()
    assert built_state.keys() == loaded_state.keys()
    assert all(torch.equal(built_state[k], loaded_state[k]) for k in built_state)

    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=rng)
    ids = torch.randint(0, len(built.tokenizer), (2, 9), generator=rng)
    mask = torch.ones(2, 9, dtype=torch.bool)
    built.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.equal(built.encode_images(images), loaded.encode_images(images))
        out_built = built.lm_forward(built.embed_tokens(ids), mask)
        out_loaded = loaded.lm_forward(loaded.embed_tokens(ids), mask)
    assert torch.equal(out_built[0], out_loaded[0]) and torch.equal(out_built[1], out_loaded[1])

    text = "pick up the red block and put it in the blue bowl"
    assert built.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids
    assert loaded.image_mean == built.image_mean and loaded.image_std == built.image_std


def test_tiny_tokenizer_has_specials_and_no_unknowns(tiny_path):
    adapter = load_backbone("llava", str(tiny_path))
    tok = adapter.tokenizer
    assert len(tok) == adapter.model.config.text_config.vocab_size
    assert None not in (adapter.bos_id, adapter.eos_id, adapter.pad_id)
    assert len({adapter.bos_id, adapter.eos_id, adapter.pad_id}) == 3
    assert adapter.image_start_id is None and adapter.image_end_id is None
    text = "Stack the 3 zebras ünder the café table! 机器人"
    ids = tok(text).input_ids
    assert ids[0] == adapter.bos_id and ids[-1] != adapter.eos_id  # Llama-style: BOS only
    assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level: nothing is ever unknown
    assert len(tok("pick up the red block").input_ids) <= 8  # the corpus made these words cheap


def test_registry_unknown_name_suggests_close_match():
    assert get_backbone_class("llava") is LlavaAdapter
    assert "llava" in available_backbones()
    with pytest.raises(KeyError, match=r"unknown backbone family 'lava'.*Did you mean 'llava'\?"):
        get_backbone_class("lava")
    with pytest.raises(KeyError) as info:
        get_backbone_class("zzz-no-such-vlm")  # close to no registered family
    assert "Did you mean" not in str(info.value) and "Registered: " in str(info.value)


def test_registry_rejects_a_second_class_under_a_taken_name():
    with pytest.raises(ValueError, match="already registered"):

        @register_backbone("llava")
        class Other(LlavaAdapter):
            pass


def test_load_backbone_needs_a_path():
    with pytest.raises(ValueError, match="model.backbone.pretrained"):
        load_backbone("llava", "")


def test_preprocess_matches_the_image_processor(tiny_path, rng):
    """Our tensor path (resize + rescale + normalise) equals the family's own image processor."""
    adapter = load_backbone("llava", str(tiny_path))
    image = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8, generator=rng)
    ours = adapter.preprocess_images(image)
    theirs = adapter.image_processor(images=[image[0].permute(1, 2, 0).numpy()], return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(ours.numpy(), theirs, atol=1e-5)
    with pytest.raises(TypeError, match="uint8"):
        adapter.preprocess_images(image.float())


def test_encode_images_shapes_any_input_size(tiny_path, rng):
    adapter = load_backbone("llava", str(tiny_path))
    images = torch.randint(0, 256, (3, 3, 48, 80), dtype=torch.uint8, generator=rng)
    features = adapter.encode_images(images)
    assert features.shape == (3, (64 // 16) ** 2, adapter.hidden_size)
    assert features.dtype == adapter.embed_dtype and torch.isfinite(features).all()


def test_lm_forward_kv_cache_matches_full_forward(tiny_path, rng):
    adapter = load_backbone("llava", str(tiny_path)).eval()
    embeds = adapter.embed_tokens(torch.randint(0, 400, (2, 7), generator=rng))
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        hidden, logits, _ = adapter.lm_forward(embeds, mask)
        h1, l1, cache = adapter.lm_forward(embeds[:, :6], mask[:, :6], use_cache=True)
        h2, l2, _ = adapter.lm_forward(embeds[:, 6:], mask, past_key_values=cache, use_cache=True)
        no_logits = adapter.lm_forward(embeds, mask, return_logits=False)[1]
    assert cache is not None and no_logits is None
    assert hidden.shape == (2, 7, adapter.hidden_size) and logits.shape == (2, 7, len(adapter.tokenizer))
    torch.testing.assert_close(l2[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1, hidden[:, :6], atol=1e-5, rtol=1e-5)


def test_gradient_checkpointing_uses_the_current_api_and_still_trains(tiny_path, rng):
    adapter = load_backbone("llava", str(tiny_path)).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated gradient_checkpointing_enable would warn
        adapter.enable_gradient_checkpointing()
    assert all(layer.gradient_checkpointing for layer in adapter.decoder_layers)
    embeds = torch.cat([adapter.encode_images(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)),
                        adapter.embed_tokens(torch.tensor([[1, 5, 6]]))], dim=1)  # fmt: skip
    hidden, _, _ = adapter.lm_forward(embeds, torch.ones(1, embeds.shape[1], dtype=torch.bool), return_logits=False)
    hidden.sum().backward()
    assert adapter.decoder_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert adapter.projector.linear_1.weight.grad.abs().sum() > 0


def test_ensure_tiny_backbone_writes_once(tmp_path):
    small = TinyBackboneConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_layers=1)
    cfg = BackboneConfig(family="llava", pretrained=str(tmp_path / "ckpt"), tiny=small)
    assert ensure_tiny_backbone(cfg) is True
    assert ensure_tiny_backbone(cfg) is False  # already there: left alone
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folder left behind
    adapter = load_backbone("llava", cfg.pretrained)
    assert isinstance(adapter, BackboneAdapter) and adapter.hidden_size == 32 and len(adapter.decoder_layers) == 1
    assert ensure_tiny_backbone(BackboneConfig(pretrained=str(tmp_path / "real"))) is False  # no tiny: never writes


def test_a_tiny_checkpoint_built_from_other_sizes_is_refused_naming_the_difference(tmp_path):
    small = TinyBackboneConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vision_layers=1)
    assert ensure_tiny_backbone(BackboneConfig(family="llava", pretrained=str(tmp_path / "ckpt"), tiny=small))
    edited = dataclasses.replace(small, patch_size=small.patch_size // 2)
    with pytest.raises(ValueError, match=r"patch_size: 16 there, 8 in the config.*delete that folder"):
        ensure_tiny_backbone(BackboneConfig(family="llava", pretrained=str(tmp_path / "ckpt"), tiny=edited))
