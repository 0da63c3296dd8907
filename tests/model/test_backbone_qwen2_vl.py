"""Qwen2-VL / Qwen2.5-VL adapter: round trip, patchify vs the processor, 3D RoPE positions vs the model's own
forward, KV cache across an image prefix, RoboVLM training (with a wrist camera: two images in one span)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel

from vla_scale.config.schema import BackboneConfig, ModelConfig, TinyBackboneConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import build_model
from vla_scale.model.backbones import Qwen2VLAdapter, Qwen25VLAdapter, build_tiny_backbone, load_backbone

TINY = TinyBackboneConfig()  # as in conftest: hidden 64, 2 layers, 64x64 images, 16 px patches -> 2x2 merged tokens
FAMILIES = {
    "qwen2_vl": (Qwen2VLAdapter, Qwen2VisionTransformerPretrainedModel),
    "qwen2_5_vl": (Qwen25VLAdapter, Qwen2_5_VisionTransformerPretrainedModel),
}
N_IMAGE = 4


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> tuple[str, Path, Qwen2VLAdapter]:
    family = request.param
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    return family, path, build_tiny_backbone(family, TINY, path, seed=0)


def images(b: int, g: torch.Generator, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def test_round_trip_is_identical(built, rng):
    family, path, adapter = built
    loaded = load_backbone(family, str(path))
    assert type(loaded) is FAMILIES[family][0] and loaded.image_size == 64 and loaded.tokens_per_image == N_IMAGE
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = images(2, rng)
    with torch.no_grad():
        feats = adapter.encode_images(pixels)
        assert torch.equal(feats, loaded.encode_images(pixels))
        embeds = torch.cat([adapter.embed_tokens(torch.tensor([[adapter.image_start_id]] * 2)), feats], dim=1)
        embeds = torch.cat([embeds, adapter.embed_tokens(torch.tensor([[adapter.image_end_id, 30, 31]] * 2))], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
        out_a, out_b = adapter.lm_forward(embeds, mask), loaded.lm_forward(embeds, mask)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    text = "pick up the red block and put it in the blue bowl"
    assert adapter.tokenizer(text).input_ids == loaded.tokenizer(text).input_ids
    assert loaded.bos_id is None and loaded.tokenizer(text).input_ids[-1] != loaded.eos_id  # Qwen style: no specials
    assert (loaded.image_start_id, loaded.image_end_id) == (
        loaded.tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        loaded.tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )


def test_patchify_matches_the_image_processor(built, rng):
    _, _, adapter = built
    pixels = images(2, rng)
    ours, grid = adapter.patchify(adapter.preprocess_images(pixels))
    theirs = adapter.image_processor(images=[p.permute(1, 2, 0).numpy() for p in pixels], return_tensors="pt")
    torch.testing.assert_close(ours, theirs["pixel_values"], atol=1e-5, rtol=0)
    assert torch.equal(grid, theirs["image_grid_thw"])


def test_modules_and_shapes(built, rng):
    family, _, adapter = built
    assert adapter.decoder_layers is adapter.model.model.language_model.layers and len(adapter.decoder_layers) == 2
    assert isinstance(adapter.vision_module, FAMILIES[family][1]) and adapter.projector is adapter.vision_module.merger
    features = adapter.encode_images(images(3, rng, size=48))  # resized to 64x64
    assert features.shape == (3, N_IMAGE, adapter.hidden_size) and torch.isfinite(features).all()
    embeds = adapter.embed_tokens(torch.randint(20, 500, (2, 5), generator=rng))  # text only: 1D positions
    hidden, logits, _ = adapter.lm_forward(embeds, torch.ones(2, 5, dtype=torch.bool))
    assert hidden.shape == (2, 5, 64) and logits.shape == (2, 5, len(adapter.tokenizer))
    assert torch.equal(adapter.position_ids(embeds, torch.ones(2, 5)), torch.arange(5).expand(3, 2, 5))


def hand_built(adapter: Qwen2VLAdapter) -> tuple[torch.Tensor, torch.Tensor]:
    """Two rows as the Qwen processor lays them out: text, <|vision_start|>, image pads, <|vision_end|>, text; row 1
    starts with the image and is right-padded."""
    c = adapter.model.config
    image = [c.vision_start_token_id] + [c.image_token_id] * N_IMAGE + [c.vision_end_token_id]
    ids = torch.tensor([[25, *image, 26, 27, 28], [*image, 26, 27, 0, 0]])
    return ids, torch.tensor([[1] * 10, [1] * 8 + [0, 0]])


def test_positions_and_logits_match_the_models_own_forward(built, rng):
    """3D RoPE ids found from the fused embeddings = the model's input_ids path (`mm_token_type_ids`), and so do
    the logits of the full top-level forward with pixels."""
    _, _, adapter = built
    ids, mask = hand_built(adapter)
    pixels = images(2, rng)
    is_image = ids == adapter.model.config.image_token_id
    proc = adapter.image_processor(images=[p.permute(1, 2, 0).numpy() for p in pixels], return_tensors="pt")
    with torch.no_grad():
        ref = adapter.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=is_image.int(), **proc)
        ref_pos, _ = adapter.model.model.get_rope_index(
            ids, is_image.int(), proc["image_grid_thw"], attention_mask=mask
        )
        embeds = adapter.embed_tokens(ids).masked_scatter(is_image.unsqueeze(-1), adapter.encode_images(pixels))
        positions = adapter.position_ids(embeds, mask.bool())
        _, logits, _ = adapter.lm_forward(embeds, mask.bool())
    assert torch.equal(positions, ref_pos)
    assert positions[:, 0].tolist() == [
        [0, 1, 2, 2, 2, 2, 4, 5, 6, 7],  # t: the image sits at t = 2
        [0, 1, 2, 2, 3, 3, 4, 5, 6, 7],  # h: rows of the 2x2 grid; text resumes at 2 + max(h, w) = 4
        [0, 1, 2, 3, 2, 3, 4, 5, 6, 7],  # w: columns
    ]
    torch.testing.assert_close(logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5, rtol=1e-5)


def test_two_images_in_one_span_get_their_own_grids(built):
    """RoboVLM puts a wrist image right after the main one inside one start/end pair."""
    _, _, adapter = built
    ids = torch.tensor([[adapter.image_start_id] + [40] * (2 * N_IMAGE) + [adapter.image_end_id, 30]])
    embeds = adapter.embed_tokens(ids)
    positions = adapter.position_ids(embeds, torch.ones_like(ids))
    assert positions[:, 0].tolist() == [
        [0, 1, 1, 1, 1, 3, 3, 3, 3, 5, 6],
        [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 6],
        [0, 1, 2, 1, 2, 3, 4, 3, 4, 5, 6],
    ]
    with pytest.raises(ValueError, match="whole images"):
        adapter.position_ids(embeds[:, :-3], torch.ones(1, 8))  # a span cut mid-image


def test_kv_cache_after_an_image_prefix_matches_the_full_forward(built, rng):
    """Cached steps continue from the prefix's rope delta (positions after an image are not the token index)."""
    _, _, adapter = built
    ids, _ = hand_built(adapter)
    ids = ids[:1]
    is_image = ids == adapter.model.config.image_token_id
    embeds = adapter.embed_tokens(ids).masked_scatter(is_image.unsqueeze(-1), adapter.encode_images(images(1, rng)))
    mask = torch.ones(ids.shape, dtype=torch.bool)
    with torch.no_grad():
        hidden, logits, _ = adapter.lm_forward(embeds, mask)
        h1, _, cache = adapter.lm_forward(embeds[:, :8], mask[:, :8], use_cache=True)
        _, l2, _ = adapter.lm_forward(embeds[:, 8:], mask, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(h1, hidden[:, :8], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2, logits[:, 8:], atol=1e-5, rtol=1e-5)


def test_robovlm_trains_with_every_parameter_getting_a_gradient(built, rng):
    family, path, _ = built
    torch.manual_seed(0)
    backbone = BackboneConfig(family=family, pretrained=str(path), gradient_checkpointing=True)
    model = build_model(ModelConfig(backbone=backbone, use_state=True), 7, 8, chunk_size=3).train()
    tok = model.adapter.tokenizer
    enc = tok(["pick up the red block", "open the drawer"], padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask.bool()
    action = torch.randn(2, 2, 3, 7, generator=rng)
    action[..., -1] = (action[..., -1] > 0).float()
    robot = Batch(
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
    vl = Batch(
        data_source="vl",
        images=torch.randint(0, 256, (2, 1, 3, 64, 64), dtype=torch.uint8, generator=rng),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.where(mask, ids, IGNORE_INDEX),
    )
    for batch in [robot, vl]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        assert torch.isfinite(out["loss"]) and out["loss"].item() > 0, batch.data_source
        out["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], batch.data_source
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        assert model.adapter.projector.mlp[0].weight.grad.abs().sum() > 0
