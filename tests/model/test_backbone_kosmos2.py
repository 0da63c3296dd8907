"""Kosmos-2 adapter: round trip, equality with Kosmos-2's own forward, mask-derived absolute positions (padding,
KV cache), bf16 the way DeepSpeed casts it, RoboVLM training and decoding (continuous and discrete, with state)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2ImageToTextProjection, Kosmos2VisionModel

from tests.model.batches import A, B, N, S, robot_batch, select, vl_batch
from vla_scale.config.schema import BackboneConfig, DiscreteActionConfig, ModelConfig, TinyBackboneConfig
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import Kosmos2Adapter, build_tiny_backbone, load_backbone

TINY = TinyBackboneConfig()  # as in conftest: hidden 64, 2 layers, 64x64 images in 16x16 patches
N_IMAGE = 4  # 16 patches -> 4 latent queries (the real 256 -> 64 ratio)
VOCAB = 512


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Kosmos2Adapter]:
    path = tmp_path_factory.mktemp("tiny_kosmos2")
    return path, build_tiny_backbone("kosmos2", TINY, path, seed=0)


def images(b: int, g: torch.Generator, size: int = 64) -> torch.Tensor:
    return torch.randint(0, 256, (b, 3, size, size), dtype=torch.uint8, generator=g)


def make_model(path: Path, chunk_size: int = N, **cfg) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="kosmos2", pretrained=str(path), gradient_checkpointing=True)
    return build_model(ModelConfig(backbone=backbone, use_state=True, **cfg), A, S, chunk_size=chunk_size).train()


def test_round_trip_is_identical_and_has_kosmos2s_specials(built, rng):
    path, adapter = built
    loaded = load_backbone("kosmos2", str(path)).eval()
    assert type(loaded) is Kosmos2Adapter and loaded.model.dtype == torch.float32
    a, b = adapter.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert loaded.lm_head.weight is loaded.model.get_input_embeddings().weight  # tied, as in the real checkpoint
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
    assert (loaded.image_start_id, loaded.image_end_id) == tuple(tok.convert_tokens_to_ids(["<image>", "</image>"]))
    assert len({loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.image_start_id, loaded.image_end_id}) == 5


def test_modules_shapes_and_preprocessing(built, rng):
    _, adapter = built
    assert adapter.decoder_layers is adapter.model.text_model.model.layers and len(adapter.decoder_layers) == 2
    assert isinstance(adapter.vision_module, Kosmos2VisionModel)
    assert isinstance(adapter.projector, Kosmos2ImageToTextProjection) and adapter.tokens_per_image == N_IMAGE
    features = adapter.encode_images(images(3, rng, size=48))  # resized to the tower's 64x64
    assert features.shape == (3, N_IMAGE, adapter.hidden_size) and torch.isfinite(features).all()
    embeds = adapter.embed_tokens(torch.randint(0, VOCAB, (2, 5), generator=rng))
    hidden, logits, _ = adapter.lm_forward(embeds, torch.ones(2, 5, dtype=torch.bool))
    assert hidden.shape == (2, 5, 64) and logits.shape == (2, 5, VOCAB)
    assert adapter.lm_forward(embeds, torch.ones(2, 5, dtype=torch.bool), return_logits=False)[1] is None
    torch.testing.assert_close(adapter.compute_logits(hidden), logits)
    image = images(1, rng)
    theirs = adapter.image_processor(images=[image[0].permute(1, 2, 0).numpy()], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(adapter.preprocess_images(image), theirs, atol=1e-5, rtol=0)


def test_lm_forward_equals_kosmos2s_own_forward_with_padding(built, rng):
    """`<s> <image> [image slots] </image> text` as Kosmos2Processor lays it out, right-padded rows: our
    unscaled embeddings + mask-derived positions give the logits of the top-level forward with pixels."""
    _, adapter = built
    tok = adapter.tokenizer
    texts = [tok(t, add_special_tokens=False).input_ids for t in ["open the drawer", "put the cup in the sink"]]
    prefix = [adapter.bos_id, adapter.image_start_id] + [0] * N_IMAGE + [adapter.image_end_id]
    length = len(prefix) + max(len(t) for t in texts)
    ids = torch.tensor([prefix + t + [adapter.pad_id] * (length - len(prefix) - len(t)) for t in texts])
    mask = ids != adapter.pad_id
    slots = torch.zeros_like(ids, dtype=torch.bool)
    slots[:, 2 : 2 + N_IMAGE] = True
    pixels = images(2, rng)
    with torch.no_grad():
        ref = adapter.model(
            pixel_values=adapter.preprocess_images(pixels),
            input_ids=ids,
            attention_mask=mask.long(),
            image_embeds_position_mask=slots.long(),
        )
        embeds = adapter.embed_tokens(ids).masked_scatter(slots.unsqueeze(-1), adapter.encode_images(pixels))
        _, logits, _ = adapter.lm_forward(embeds, mask)
    torch.testing.assert_close(logits[mask], ref.logits[mask], atol=1e-5, rtol=1e-5)


def test_kv_cache_and_left_padding_keep_the_absolute_positions(built, rng):
    """Sinusoidal positions count real tokens only: a cached step and a left-padded row match the plain forward."""
    _, adapter = built
    embeds = adapter.embed_tokens(torch.randint(5, VOCAB, (1, 7), generator=rng))
    mask = torch.ones(1, 7, dtype=torch.bool)
    padded = torch.cat([adapter.embed_tokens(torch.full((1, 3), adapter.pad_id)), embeds], dim=1)
    padded_mask = torch.cat([torch.zeros(1, 3, dtype=torch.bool), mask], dim=1)
    with torch.no_grad():
        hidden, logits, _ = adapter.lm_forward(embeds, mask)
        h1, _, cache = adapter.lm_forward(embeds[:, :6], mask[:, :6], use_cache=True)
        _, l2, _ = adapter.lm_forward(embeds[:, 6:], mask, past_key_values=cache, use_cache=True)
        _, l3, cache = adapter.lm_forward(padded[:, :-1], padded_mask[:, :-1], use_cache=True)
        _, l4, _ = adapter.lm_forward(padded[:, -1:], padded_mask, past_key_values=cache, use_cache=True)
    assert adapter.position_ids(padded_mask, 10, 0).tolist() == [[0, 0, 0, 1, 2, 3, 4, 5, 6, 7]]  # padding_idx 0
    torch.testing.assert_close(h1, hidden[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l2[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l3[:, 3:], logits[:, :6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(l4[:, -1], logits[:, -1], atol=1e-5, rtol=1e-5)


def test_bf16_parameters_with_fp32_buffers_train_like_under_deepspeed(built):
    """DeepSpeed 0.19 bf16 casts parameters only (`_cast_module_mixed_precision`); the sinusoidal table stays fp32.
    Without the adapter's hook the decoder's hidden states became fp32 and the first bf16 LayerNorm raised
    "mixed dtype (CPU): expect parameter to have scalar type of Float"."""
    path, _ = built
    model = make_model(path)
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)
    assert model.adapter.text_decoder.embed_positions.weights.dtype == torch.float32
    for batch in [robot_batch(model), vl_batch(model)]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out["loss"].backward()
        out.pop("num_tokens")
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values()), batch.data_source
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and g.dtype == torch.bfloat16 and torch.isfinite(g).all() for g in grads)
        assert model.adapter.decoder_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    hidden, _, _ = model.adapter.lm_forward(model.adapter.embed_tokens(torch.tensor([[1, 9]])), torch.ones(1, 2))
    assert hidden.dtype == torch.bfloat16  # the LM really ran in bf16, not promoted to fp32
    full = build_model(  # a bf16 load (buffers bf16 too) works as well
        ModelConfig(backbone=BackboneConfig(family="kosmos2", pretrained=str(path))), A, S, N, torch_dtype="bfloat16"
    )
    assert torch.isfinite(full(robot_batch(full))["loss"])


@pytest.mark.parametrize("action_space", ["continuous", "discrete"])
def test_robovlm_trains_with_state_and_every_parameter_gets_a_gradient(built, action_space):
    path, _ = built
    model = make_model(path, action_space=action_space)
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


def test_discrete_cached_and_uncached_decoding_agree_and_ignore_padding(built):
    path, _ = built
    # All 256 bins compete (with few, the tied tiny embeddings lock each row onto one id after the first step).
    model = make_model(path, chunk_size=2, action_space="discrete", discrete=DiscreteActionConfig(n_bin=256)).eval()
    batch = robot_batch(model)  # first frame only, chunk of 2: 14 greedy steps per row
    batch.images, batch.state = batch.images[:, :1], batch.state[:, :1]
    cached = model.decode_action_ids(batch.observation)
    uncached = model.decode_action_ids(batch.observation, use_cache=False)
    assert cached.shape == (B, 1, 2, A) and torch.equal(cached, uncached)
    assert cached.unique().numel() > 2 and ((cached >= VOCAB - 256) & (cached < VOCAB)).all()
    alone = select(batch, 1)  # the short instruction, unpadded: absolute positions must not see the padding
    ids = model.decode_action_ids(alone.observation)
    assert torch.equal(ids, cached[1:])
