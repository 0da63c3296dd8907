"""Discrete action space: the action tokenizer, label layout, loss, KV-cached greedy decoding, overfitting, config."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.model.batches import DISCRETE_A, DISCRETE_N, DISCRETE_T, discrete_batch, vl_batch
from vla_scale.config import ConfigError, load_config
from vla_scale.config.schema import BackboneConfig, DiscreteActionConfig, ModelConfig
from vla_scale.data.batch import IGNORE_INDEX
from vla_scale.data.observation import Observation
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.action_tokenizer import ActionTokenizer

ROOT = Path(__file__).resolve().parents[2]
B, T, N, A, S = 2, DISCRETE_T, DISCRETE_N, DISCRETE_A, 8  # 3 arm dims + gripper, chunk of 2: 8 action ids per frame
N_IMAGE = 16
VOCAB = 512  # the tiny tokenizer


def make_discrete(tiny_path, checkpointing: bool = False, **discrete) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=checkpointing)
    cfg = ModelConfig(backbone=backbone, action_space="discrete", discrete=DiscreteActionConfig(**discrete))
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()


# --- tokenizer --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dims", [7, 3])
def test_round_trip_error_is_at_most_half_a_bin(dims):
    tok = ActionTokenizer(VOCAB, n_bin=256, min_action=-1.0, max_action=1.0)
    actions = torch.rand(64, 5, dims, generator=torch.Generator().manual_seed(dims)) * 2 - 1
    ids = tok.encode(actions)
    assert ids.shape == actions.shape and ids.dtype == torch.long
    assert ((ids >= VOCAB - 256) & (ids < VOCAB)).all()
    assert (tok.decode(ids) - actions).abs().max() <= tok.bin_width / 2 + 1e-6


def test_clipping_edges_reserved_range_and_gripper():
    tok = ActionTokenizer(VOCAB, n_bin=4, min_action=-1.0, max_action=1.0)  # bins of width 0.5
    assert tok.first_id == VOCAB - 4
    x = torch.tensor([-5.0, -1.0, -0.51, -0.49, 0.0, 0.99, 1.0, 7.0, float("nan")])
    assert (tok.encode(x) - tok.first_id).tolist() == [0, 0, 0, 1, 2, 3, 3, 3, 0]
    assert tok.decode(torch.tensor([508, 509, 510, 511])).tolist() == [-0.75, -0.25, 0.25, 0.75]
    # gripper {0, 1} goes to the two extreme bins and back, whatever the range
    chunk = torch.tensor([[0.3, -0.3, 0.0], [0.3, -0.3, 1.0]])
    ids = tok.encode_chunk(chunk)
    assert ids[:, -1].tolist() == [tok.first_id, VOCAB - 1]
    arm, gripper = tok.decode_chunk(ids)
    assert arm.shape == (2, 2) and gripper.tolist() == [[0.0], [1.0]]
    two = ActionTokenizer(VOCAB, n_bin=2)
    assert two.encode_chunk(torch.tensor([[0.0], [1.0]])).flatten().tolist() == [VOCAB - 2, VOCAB - 1]


def test_tokenizer_rejects_bad_settings(tiny_built):
    tokenizer = tiny_built[1].tokenizer
    assert ActionTokenizer(tokenizer, n_bin=16).first_id == tokenizer.vocab_size - 16
    with pytest.raises(ValueError, match="n_bin"):
        ActionTokenizer(VOCAB, n_bin=VOCAB)
    with pytest.raises(ValueError, match="n_bin"):
        ActionTokenizer(VOCAB, n_bin=1)
    with pytest.raises(ValueError, match="min_action"):
        ActionTokenizer(VOCAB, min_action=1.0, max_action=1.0)


# --- sequence layout and loss ------------------------------------------------------------------------------
def test_labels_sit_exactly_on_the_action_ids_and_eos(tiny_path):
    model = make_discrete(tiny_path, n_bin=4, supervise_eos=True)
    batch = discrete_batch(model, extra_pad=2)
    # hand-built chunk: bins 0,1,2,3 (width 0.5 on [-1, 1]) and gripper open/closed -> first/last bin
    batch.action = torch.tensor([[-0.9, -0.1, 0.3, 0.0], [0.9, 0.6, -0.6, 1.0]]).expand(B, T, N, A).clone()
    batch.action[0, 0, 1] = float("nan")  # masked step (the batch masks sample 0's last step)
    first = VOCAB - 4
    step0, step1 = [first + b for b in (0, 1, 2, 0)], [first + b for b in (3, 3, 0, 3)]
    ids, labels = model.actions.labels(batch)
    assert ids[1].tolist() == step0 + step1
    assert labels[0].tolist() == step0 + [IGNORE_INDEX] * A and labels[1].tolist() == step0 + step1
    slot = {"action_ids": ids, "action_labels": labels, "append_eos": True, "eos_label": True}
    fused = model.robot_sequence(batch.observation, **slot)
    eos = model.adapter.eos_id
    for i, n_text in enumerate(batch.text_mask.sum(dim=1).tolist()):
        start = 1 + N_IMAGE + n_text  # BOS, image, instruction (no specials), then the action ids
        expected = [IGNORE_INDEX] * start + labels[i].tolist() + [eos]
        expected += [IGNORE_INDEX] * (fused.labels.shape[1] - len(expected))  # padding
        assert fused.labels[i].tolist() == expected
        assert fused.action_mask[i].nonzero().flatten().tolist() == list(range(start, start + N * A))
        assert fused.attention_mask[i].sum() == start + N * A + 1
        torch.testing.assert_close(fused.embeds[i, start : start + N * A], model.adapter.embed_tokens(ids[i]))
    # the loss projects only supervised positions; it must equal the plain shifted CE over full logits
    out = model(batch)
    _, logits, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), fused.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss_action_ce"], ce, rtol=1e-5, atol=1e-5)
    assert out["num_tokens"] == fused.attention_mask.sum()


def test_forward_backward_and_zero_touch(tiny_path):
    model = make_discrete(tiny_path, checkpointing=True)
    assert model.action_head is None and model.action_token is None
    assert not [n for n, _ in model.named_parameters() if n.startswith("action_")]
    out = model(discrete_batch(model))
    assert set(out) == {"loss", "loss_action_ce", "acc_action_token", "num_tokens"}
    assert torch.isfinite(out["loss_action_ce"]) and out["loss_action_ce"] > 0
    assert out["loss"].item() == model.cfg.loss_weights.action_ce * out["loss_action_ce"].item()
    assert 0.0 <= out["acc_action_token"].item() <= 1.0
    out["loss"].backward()
    for i, layer in enumerate(model.adapter.decoder_layers):
        assert all(p.grad.abs().sum() > 0 for p in layer.parameters()), f"decoder layer {i}"
    assert model.adapter.lm_head.weight.grad[VOCAB - 256 :].abs().sum() > 0
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.zero_grad(set_to_none=True)
    vl = model(vl_batch(model))
    assert set(vl) == {"loss", "loss_vl", "num_tokens"} and torch.isfinite(vl["loss"])
    vl["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


# --- decoding ------------------------------------------------------------------------------------------------
def test_cached_and_uncached_decoding_agree_and_ignore_padding(tiny_path):
    model = make_discrete(tiny_path, n_bin=64).eval()
    with torch.no_grad():  # spread the action rows so greedy ids depend on the context (random init ties them)
        model.adapter.lm_head.weight[VOCAB - 64 :] *= 30
    batch = discrete_batch(model)
    cached = model.decode_action_ids(batch.observation)
    uncached = model.decode_action_ids(batch.observation, use_cache=False)
    assert cached.shape == (B, T, N, A) and torch.equal(cached, uncached)
    assert cached.unique().numel() > 2 and ((cached >= VOCAB - 64) & (cached < VOCAB)).all()
    n = int(batch.text_mask[1].sum())  # sample 1 alone, no padding, equals its row in the padded batch
    alone = model.decode_action_ids(Observation(batch.images[1:], batch.text_ids[1:, :n], batch.text_mask[1:, :n]))
    assert torch.equal(alone, cached[1:])
    arm, gripper = model.predict_action(batch.observation)
    assert arm.shape == (B, T, N, A - 1) and gripper.shape == (B, T, N, 1)
    assert set(gripper.unique().tolist()) <= {0.0, 1.0}
    torch.testing.assert_close(arm, model.action_tokenizer.decode(cached)[..., :-1])


def test_overfits_one_batch_and_decodes_the_targets(tiny_path):
    model = make_discrete(tiny_path, n_bin=32)
    batch = discrete_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss_action_ce"].item())
    assert losses[-1] < 0.1 * losses[0], losses
    model.eval()
    arm, gripper = model.predict_action(batch.observation)
    mask = batch.action_mask
    width = model.action_tokenizer.bin_width
    assert (arm - batch.action[..., :-1]).abs()[mask].max() <= 2 * width
    assert torch.equal(gripper[mask], batch.action[..., -1:][mask])


# --- config ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("model.discrete.n_bin=1", r"model\.discrete\.n_bin"),
        ("model.discrete.min_action=1.0", r"model\.discrete\.min_action"),
        ("model.discrete.nbin=8", r"model\.discrete\.nbin.*'n_bin'"),
        ("model.action_space=discret", r"model\.action_space.*'discrete'"),
        ("model.loss_weights.action_ce=-1", r"model\.loss_weights\.action_ce"),
    ],
)
def test_bad_discrete_config_names_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", ["model.action_space=discrete", override])


def test_discrete_config_loads_and_model_checks_the_vocabulary(tiny_path):
    cfg = load_config(ROOT / "configs/debug.yaml", ["model.action_space=discrete", "model.discrete.n_bin=64"])
    assert cfg.model.action_space == "discrete" and cfg.model.discrete.n_bin == 64
    with pytest.raises(ValueError, match=r"model\.discrete\.n_bin \(512\).*vocabulary"):
        make_discrete(tiny_path, n_bin=VOCAB)
    with pytest.raises(ValueError, match=r"model\.discrete\.n_bin=509.*special token ids \[3\]"):
        make_discrete(tiny_path, n_bin=509)
