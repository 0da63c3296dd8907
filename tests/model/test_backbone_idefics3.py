"""Idefics3 / SmolVLM adapter: round trip, image tokens vs the model's own `get_image_features`, equality with the
top-level forward on the processor's single-image layout, KV cache, RoboVLM training and decoding with state."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector, Idefics3VisionTransformer
from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

from tests.model.batches import A, B, N, S, robot_batch, select, vl_batch
from vla_scale.config.schema import BackboneConfig, DiscreteActionConfig, ModelConfig, TinyBackboneConfig
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import Idefics3Adapter, SmolVLMAdapter, build_tiny_backbone, load_backbone

TINY = TinyBackboneConfig()  # as in conftest: hidden 64, 2 layers, 64x64 images in 16x16 patches
FAMILIES = {
    "idefics3": (Idefics3Adapter, Idefics3VisionTransformer, Idefics3Connector),
    "smolvlm": (SmolVLMAdapter, SmolVLMVisionTransformer, SmolVLMConnector),
}
N_SHUFFLED = 4  # 4x4 patches, pixel shuffle by 2 -> 2x2 tokens
N_IMAGE = 1 + N_SHUFFLED  # <global-img> tag + connector tokens
VOCAB = 512


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request, tmp_path_factory) -> tuple[str, Path, Idefics3Adapter]:
    family = request.param
    path = tmp_path_factory.mktemp(f"tiny_{family}")
    return family, path, build_tiny_backbone(family, TINY, path, seed=0)


def images(b: int, g: torch.Generator, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def make_model(family: str, path: Path, chunk_size: int = N, **cfg) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family=family, pretrained=str(path), gradient_checkpointing=True)
    return build_model(ModelConfig(backbone=backbone, use_state=True, **cfg), A, S, chunk_size=chunk_size).train()


def test_round_trip_is_identical_and_has_the_image_specials(built, rng):
    family, path, adapter = built
    loaded = load_backbone(family, str(path)).eval()
    assert type(loaded) is FAMILIES[family][0] and loaded.model.dtype == torch.float32
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids, mask = torch.randint(0, VOCAB, (2, 9), generator=rng), torch.ones(2, 9, dtype=torch.bool)
    pixels = images(2, rng)
    with torch.no_grad():
        assert torch.equal(adapter.encode_images(pixels), loaded.encode_images(pixels))
        out_a = adapter.lm_forward(adapter.embed_tokens(ids), mask)
        out_b = loaded.lm_forward(loaded.embed_tokens(ids), mask)
    assert torch.equal(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    tok = loaded.tokenizer
    text = "pick up the red block and put it in the blue bowl"
    assert adapter.tokenizer(text).input_ids == tok(text).input_ids and tok(text).input_ids[0] == loaded.bos_id
    fake, image, tag = tok.convert_tokens_to_ids(["<fake_token_around_image>", "<image>", "<global-img>"])
    assert loaded.image_start_id == loaded.image_end_id == fake and loaded.global_image_id == tag
    assert loaded.model.config.image_token_id == image
    assert not loaded.image_processor.do_image_splitting and loaded.image_size == TINY.image_size


def test_modules_shapes_and_image_tokens(built, rng):
    """The tokens are the `<global-img>` tag, then exactly what the model's own `get_image_features` returns."""
    family, _, adapter = built
    _, tower, connector = FAMILIES[family]
    assert adapter.decoder_layers is adapter.model.model.text_model.layers and len(adapter.decoder_layers) == 2
    assert isinstance(adapter.vision_module, tower) and isinstance(adapter.projector, connector)
    assert adapter.image_seq_len == N_SHUFFLED and adapter.tokens_per_image == N_IMAGE
    features = adapter.encode_images(images(3, rng, size=48))  # resized to the tower's 64x64
    assert features.shape == (3, N_IMAGE, adapter.hidden_size) and torch.isfinite(features).all()
    pixels = images(2, rng)
    with torch.no_grad():
        ours = adapter.encode_images(pixels)
        theirs = adapter.model.model.get_image_features(adapter.preprocess_images(pixels)[:, None], return_dict=True)
    torch.testing.assert_close(ours[:, 1:], torch.stack(list(theirs.pooler_output)))
    torch.testing.assert_close(ours[:, 0], adapter.embed_tokens(torch.tensor([adapter.global_image_id] * 2)))
    image = images(1, rng)
    proc = adapter.image_processor(images=[image[0].permute(1, 2, 0).numpy()], return_tensors="pt")
    assert proc["pixel_values"].shape == (1, 1, 3, 64, 64)  # one image, no tiles
    torch.testing.assert_close(adapter.preprocess_images(image), proc["pixel_values"][:, 0], atol=1e-5, rtol=0)


def test_lm_forward_equals_the_models_own_forward(built, rng):
    """`<fake><global-img><image> x N<fake> text` as the processor lays out one unsplit image, right-padded."""
    _, _, adapter = built
    tok, config = adapter.tokenizer, adapter.model.config
    texts = [tok(t, add_special_tokens=False).input_ids for t in ["open the drawer", "put the cup in the sink"]]
    fake = adapter.image_start_id
    prefix = [adapter.bos_id, fake, adapter.global_image_id] + [config.image_token_id] * N_SHUFFLED + [fake]
    length = len(prefix) + max(len(t) for t in texts)
    ids = torch.tensor([prefix + t + [adapter.pad_id] * (length - len(prefix) - len(t)) for t in texts])
    mask = torch.tensor([[1] * (len(prefix) + len(t)) + [0] * (length - len(prefix) - len(t)) for t in texts])
    pixels = images(2, rng)
    with torch.no_grad():
        ref = adapter.model(input_ids=ids, attention_mask=mask, pixel_values=adapter.preprocess_images(pixels)[:, None])
        embeds = torch.cat(
            [
                adapter.embed_tokens(ids[:, :2]),
                adapter.encode_images(pixels),
                adapter.embed_tokens(ids[:, 2 + N_IMAGE :]),
            ],
            dim=1,
        )
        _, logits, _ = adapter.lm_forward(embeds, mask.bool())
    torch.testing.assert_close(logits[mask.bool()], ref.logits[mask.bool()], atol=1e-5, rtol=1e-5)


def test_kv_cache_matches_the_full_forward(built, rng):
    _, _, adapter = built
    embeds = adapter.embed_tokens(torch.randint(5, VOCAB, (2, 7), generator=rng))
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        hidden, logits, _ = adapter.lm_forward(embeds, mask)
        h1, _, cache = adapter.lm_forward(embeds[:, :6], mask[:, :6], use_cache=True)
        _, l2, _ = adapter.lm_forward(embeds[:, 6:], mask, past_key_values=cache, use_cache=True)
    torch.testing.assert_close(h1, hidden[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter.compute_logits(hidden), logits)


@pytest.mark.parametrize("action_space", ["continuous", "discrete"])
def test_robovlm_trains_with_state_and_every_parameter_gets_a_gradient(built, action_space):
    family, path, _ = built
    model = make_model(family, path, action_space=action_space)
    for batch in [robot_batch(model), vl_batch(model)]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        assert torch.isfinite(out["loss"]) and out["loss"].item() > 0, batch.data_source
        out["loss"].backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert missing == [], batch.data_source
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        adapter = model.adapter
        used = [adapter.vision_module, adapter.projector, adapter.decoder_layers[0]]
        used += [model.state_encoder] if batch.data_source == "robot" else []  # VL batches have no state
        for module in used:
            assert sum(p.grad.abs().sum() for p in module.parameters()) > 0, (batch.data_source, type(module))


def test_bf16_parameters_with_fp32_buffers_train(built):
    """DeepSpeed 0.19 bf16 casts parameters only; Llama's fp32 rotary buffers must not break either path."""
    family, path, _ = built
    model = make_model(family, path)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    for batch in [robot_batch(model), vl_batch(model)]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        assert torch.isfinite(out["loss"]) and out["loss"].dtype == torch.float32, batch.data_source
        assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)


def test_discrete_cached_and_uncached_decoding_agree_and_ignore_padding(built):
    family, path, _ = built
    discrete = DiscreteActionConfig(n_bin=64)
    model = make_model(family, path, chunk_size=2, action_space="discrete", discrete=discrete).eval()
    batch = robot_batch(model)  # first frame only, chunk of 2: 14 greedy steps per row
    batch.images, batch.state = batch.images[:, :1], batch.state[:, :1]
    cached = model.decode_action_ids(batch.observation)
    uncached = model.decode_action_ids(batch.observation, use_cache=False)
    assert cached.shape == (B, 1, 2, A) and torch.equal(cached, uncached)
    assert cached.unique().numel() > 2 and ((cached >= VOCAB - 64) & (cached < VOCAB)).all()
    alone = select(batch, 1)  # the short instruction, unpadded, decodes as its row in the padded batch
    ids = model.decode_action_ids(alone.observation)
    assert torch.equal(ids, cached[1:])
