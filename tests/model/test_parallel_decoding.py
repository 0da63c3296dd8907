"""`model.action_space: parallel` (OFT-style): the chunk from one LM pass with bidirectional attention among the
action positions, the prefix blind to them.

The reference is a position-by-position loop through the tiny LLaVA's Llama layers (their own projections, norms
and rotary embedding), each query attending to the keys the rules allow, written out literally here; the single
pass through transformers with the 4-D mask must give the same chunk. Per family, the prefix's states must equal
a plain causal pass without action positions, and the first chunk step must move when only the last step's
embedding changes (it could not under a causal mask).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from tests.model.batches import A, N, S, robot_batch, vl_batch
from vla_scale.config.errors import ConfigError
from vla_scale.config.load import config_section
from vla_scale.config.schema import ModelConfig, TinyBackboneConfig, TinyClipConfig
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import available_backbones, build_tiny_backbone
from vla_scale.model.clip_regularizer import build_tiny_clip
from vla_scale.model.parallel import parallel_allowed, parallel_attention_bias

FAMILIES = [f for f in available_backbones() if f != "kosmos2"]  # Kosmos-2 is refused (test below)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    out = {}
    for family in FAMILIES:
        out[family] = root / family
        build_tiny_backbone(family, TinyBackboneConfig(), out[family], seed=0)
    out["clip"] = root / "clip"
    build_tiny_clip(TinyClipConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64), 16, out["clip"])
    return out


def _model(folder: Path, family: str = "llava", **model: object) -> RoboVLM:
    spec = {"backbone": {"family": family, "pretrained": str(folder)}, "action_space": "parallel", **model}
    torch.manual_seed(0)
    return build_model(config_section(ModelConfig, spec, "model"), action_dim=A, state_dim=S, chunk_size=N)


def _parallel_inputs(model: RoboVLM, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused sequence with each action position holding its step's embedding: (embeds, real, is-action)."""
    fused = model.robot_sequence(batch.observation, n_action=N, action_token=model.action_token[0])
    embeds = fused.embeds.clone()
    for row in range(embeds.shape[0]):
        idx = fused.action_mask[row].nonzero().flatten()
        for k, pos in enumerate(idx.tolist()):
            embeds[row, pos] = model.action_token[k % N]
    return embeds, fused.attention_mask, fused.action_mask


def _visible(real: list[bool], action: list[bool]) -> list[list[int]]:
    """The rules, query by query: a prefix query sees real prefix keys up to itself; an action query also sees
    every position of its own contiguous action slot; everyone sees itself."""
    slot, current, prev = [], 0, False
    for a in action:
        current += a and not prev
        slot.append(current if a else 0)
        prev = a
    out = []
    for i in range(len(real)):
        keys = [
            j
            for j in range(len(real))
            if j == i or (real[j] and ((not action[j] and j <= i) or (action[i] and action[j] and slot[i] == slot[j])))
        ]
        out.append(keys)
    return out


def _reference_hidden(lm: torch.nn.Module, embeds: torch.Tensor, visible: list[list[int]]) -> torch.Tensor:
    """One row `[L, D]` through the Llama decoder, every query's attention computed on its own."""
    length = embeds.shape[0]
    x = embeds[None]
    cos, sin = lm.rotary_emb(x, torch.arange(length)[None])
    for layer in lm.layers:
        att = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = (
            proj(h).view(1, length, -1, att.head_dim).transpose(1, 2) for proj in (att.q_proj, att.k_proj, att.v_proj)
        )
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k, v = repeat_kv(k, att.num_key_value_groups), repeat_kv(v, att.num_key_value_groups)
        rows = []
        for i, keys in enumerate(visible):
            scores = (q[:, :, i : i + 1] @ k[:, :, keys].transpose(-1, -2)) * att.scaling
            rows.append(scores.softmax(dim=-1) @ v[:, :, keys])
        x = x + att.o_proj(torch.cat(rows, dim=2).transpose(1, 2).reshape(1, length, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.norm(x)[0]


def test_mask_follows_the_rules_on_two_slots_and_padding():
    # row 0: prefix p p, slot 1 (2 actions), prefix p, slot 2 (2 actions), padding; row 1: p p p a a, padding x2
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    action = torch.tensor([[0, 0, 1, 1, 0, 1, 1, 0], [0, 0, 0, 1, 1, 0, 0, 0]], dtype=torch.bool)
    allowed = parallel_allowed(real, action)
    expected0 = [
        [1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0],  # action: prefix before it and its whole slot, including the later position
        [1, 1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0, 0],  # prefix after slot 1 does not see slot 1
        [1, 1, 0, 0, 1, 1, 1, 0],  # slot 2 does not see slot 1
        [1, 1, 0, 0, 1, 1, 1, 0],
        [1, 1, 0, 0, 1, 0, 0, 1],  # padding: the real prefix and itself
    ]
    assert allowed[0].int().tolist() == expected0
    for b in range(2):
        visible = _visible(real[b].tolist(), action[b].tolist())
        dense = [[int(j in keys) for j in range(8)] for keys in visible]
        assert allowed[b].int().tolist() == dense
    bias = parallel_attention_bias(real, action, torch.float32)
    assert bias.shape == (2, 1, 8, 8)
    assert ((bias == 0) == allowed.unsqueeze(1)).all()
    assert (bias[~allowed.unsqueeze(1)] == torch.finfo(torch.float32).min).all()


@pytest.mark.parametrize("history_type", ["post", "pre"])
def test_single_pass_equals_position_by_position_reference(folders, history_type):
    model = _model(folders["llava"], history_type=history_type).eval()
    batch = robot_batch(model, extra_pad=2)
    calls = []
    hook = model.adapter.language_model.register_forward_hook(lambda *_: calls.append(1))
    arm, grip = model.predict_action(batch.observation)
    hook.remove()
    assert len(calls) == 1  # the whole window's chunks from one LM pass
    with torch.no_grad():
        embeds, real, action = _parallel_inputs(model, batch)
        lm = model.adapter.language_model
        steps = []
        for row in range(embeds.shape[0]):
            visible = _visible(real[row].tolist(), action[row].tolist())
            hidden = _reference_hidden(lm, embeds[row], visible)
            steps.append(model.action_head(hidden[action[row]]))
    ref = torch.cat(steps).view(*arm.shape[:-1], A)
    torch.testing.assert_close(arm, ref[..., : A - 1], atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(grip, torch.sigmoid(ref[..., A - 1 :]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_is_blind_to_actions_and_actions_see_each_other(folders, family):
    model = _model(folders[family], family).eval()
    batch = robot_batch(model)
    obs = batch.observation
    with torch.no_grad():
        embeds, real, action = _parallel_inputs(model, batch)
        bias = parallel_attention_bias(real, action, embeds.dtype)
        hidden, _, _ = model.adapter.lm_forward(embeds, real, return_logits=False, attention_bias=bias)
        prefix = model.robot_sequence(obs)  # no action slot: the plain causal path, no 4-D mask
        plain, _, _ = model.adapter.lm_forward(prefix.embeds, prefix.attention_mask, return_logits=False)
        for row in range(embeds.shape[0]):
            ours = hidden[row][real[row] & ~action[row]]
            torch.testing.assert_close(ours, plain[row][prefix.attention_mask[row]], atol=1e-5, rtol=1e-4)
        # The model's own pass is this one.
        arm, _ = model.predict_action(obs)
        head = model.action_head(hidden[action]).view(*arm.shape[:-1], A)
        torch.testing.assert_close(arm, head[..., : A - 1], atol=1e-5, rtol=1e-4)
        # Changing only the last step's embedding moves the first step (it attends forward) ...
        model.action_token[N - 1] += 1.0
        moved, _ = model.predict_action(obs)
    assert (moved[:, :, 0] - arm[:, :, 0]).abs().max() > 1e-4
    # ... and only the action positions changed: the prefix states above were computed without them.


@pytest.mark.parametrize(
    "family, extra",
    [
        ("llava", {"history_type": "post", "lora": {"enabled": True, "r": 2, "alpha": 4}, "clip_reg": True}),
        ("qwen2_vl", {"history_type": "pre", "film": True, "use_state": True}),
        ("paligemma", {"history_type": "video", "resampler": {"enabled": True, "num_latents": 3, "depth": 1}}),
    ],
)
def test_forward_backward_on_families(folders, family, extra):
    if extra.get("clip_reg"):
        extra = {**extra, "clip_reg": {"enabled": True, "pretrained": str(folders["clip"]), "embed_dim": 16}}
    model = _model(folders[family], family, **extra).train()
    robot = model(robot_batch(model))
    assert {"loss", "loss_arm", "loss_gripper", "acc_gripper"} <= set(robot) and torch.isfinite(robot["loss"])
    assert ("loss_clip" in robot) == bool(extra.get("clip_reg"))
    vl = model(vl_batch(model))
    (robot["loss"] + vl["loss"]).backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient (ZeRO needs the same set on every rank): {missing[:5]}"
    for name in ("action_token", "action_head.weight"):
        assert trainable[name].grad.abs().sum() > 0, name
    assert model.action_token.grad.abs().sum(dim=1).gt(0).all()  # every chunk step's embedding is used


def test_loss_decreases_overfitting_one_batch(folders):
    model = _model(folders["llava"], use_state=True).train()
    batch = robot_batch(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(25):
        out = model(batch)
        losses.append(out["loss_arm"].item())
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"backbone": {"family": "kosmos2", "pretrained": "x"}}, "custom 4-D attention mask"),
        ({"latent_num": 2}, "latent_num"),
        ({"head": {"type": "gpt", "num_heads": 2}}, "head.type=gpt"),
    ],
)
def test_config_refuses_what_cannot_work(extra, message):
    spec = {"backbone": {"family": "llava", "pretrained": "x"}, "action_space": "parallel", **extra}
    cfg = config_section(ModelConfig, spec, "model")
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


def test_kosmos2_is_refused_by_the_model_and_its_adapter(tmp_path):
    folder = tmp_path / "kosmos2"
    adapter = build_tiny_backbone("kosmos2", TinyBackboneConfig(), folder, seed=0)
    embeds = torch.zeros(1, 3, adapter.hidden_size)
    real = torch.ones(1, 3, dtype=torch.bool)
    bias = parallel_attention_bias(real, torch.tensor([[False, True, True]]), embeds.dtype)
    with pytest.raises(ValueError, match="custom 4-D attention mask"):
        adapter.lm_forward(embeds, real, attention_bias=bias)
    cfg = config_section(
        ModelConfig, {"backbone": {"family": "kosmos2", "pretrained": str(folder)}, "action_space": "parallel"}, "model"
    )
    with pytest.raises(ConfigError, match="custom 4-D attention mask"):  # built without load_config's validation
        build_model(cfg, action_dim=A, state_dim=S, chunk_size=N)
