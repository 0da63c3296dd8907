"""Every backbone family × the mechanisms, built tiny and trained one step (forward + backward, robot and VL).

Pairwise rather than the full product: each family runs three model configs drawn from a
rotation, so every family meets both action spaces, and every mechanism (history post/pre/video,
heads mlp/lstm/gpt, state token, resampler, CLIP regulariser, LoRA, instruction-first) appears
with several families.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vla_scale.config.load import config_section
from vla_scale.config.schema import ModelConfig, TinyBackboneConfig, TinyClipConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import build_model
from vla_scale.model.backbones import available_backbones, build_tiny_backbone
from vla_scale.model.clip_regularizer import build_tiny_clip

FAMILIES = ["llava", "paligemma", "paligemma2", "qwen2_vl", "qwen2_5_vl", "kosmos2", "idefics3", "smolvlm"]
A, S, N = 4, 4, 2  # action dims (3 arm + gripper), state dims, chunk length
CLIP_DIM = 16

ROTATION = [
    {"action_space": "continuous", "history_type": "post", "head": {"type": "mlp"}, "use_state": True},
    {"action_space": "discrete", "history_type": "pre", "resampler": True, "instruction_first": True},
    {"action_space": "continuous", "history_type": "post", "head": {"type": "gpt"}, "lora": True, "clip": True},
    {"action_space": "continuous", "history_type": "video", "resampler": True, "use_state": True},
    {"action_space": "discrete", "history_type": "post", "use_state": True, "clip": True, "lora": True},
    {"action_space": "continuous", "history_type": "post", "head": {"type": "lstm"}, "resampler": True},
    {"action_space": "continuous", "history_type": "pre", "clip": True, "instruction_first": True},
    {"action_space": "discrete", "history_type": "video", "lora": True},
]


def _cases() -> list[tuple[str, int]]:
    return [(family, (i + k) % len(ROTATION)) for i, family in enumerate(FAMILIES) for k in range(3)]


def test_the_matrix_covers_every_family_and_mechanism():
    assert sorted(FAMILIES) == available_backbones()
    used = [ROTATION[r] for _, r in _cases()]
    for family in FAMILIES:
        spaces = {ROTATION[r]["action_space"] for f, r in _cases() if f == family}
        assert spaces == {"continuous", "discrete"}, family
    assert {u["history_type"] for u in used} == {"post", "pre", "video"}
    assert {u.get("head", {}).get("type", "mlp") for u in used} == {"mlp", "lstm", "gpt"}
    for flag in ("use_state", "resampler", "clip", "lora", "instruction_first"):
        assert sum(bool(u.get(flag)) for u in used) >= 3, flag


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("matrix")
    out = {}
    for family in FAMILIES:
        out[family] = root / family
        build_tiny_backbone(family, TinyBackboneConfig(), out[family], seed=0)
    out["clip"] = root / "clip"
    clip = TinyClipConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64)
    build_tiny_clip(clip, CLIP_DIM, out["clip"])
    return out


def _model_dict(folders: dict[str, Path], family: str, rotation: int) -> dict:
    spec = dict(ROTATION[rotation])
    model: dict = {
        "backbone": {"family": family, "pretrained": str(folders[family]), "gradient_checkpointing": True},
        "action_space": spec["action_space"],
        "history_type": spec["history_type"],
        "latent_num": 2,
        "use_state": bool(spec.get("use_state")),
        "instruction_first": bool(spec.get("instruction_first")),
        "head": {"hidden_size": 32, **spec.get("head", {})},
        "discrete": {"n_bin": 32},
        "loss_weights": {"gripper": 0.1, "clip": 0.5},
    }
    if model["head"].get("type") in ("gpt", "lstm"):
        model["head"].update(num_layers=1, num_heads=2, max_history=2)
    if spec.get("resampler"):
        model["resampler"] = {"enabled": True, "num_latents": 3, "depth": 1, "heads": 2, "dim_head": 8, "ff_mult": 1}
    if spec.get("clip"):
        model["clip_reg"] = {"enabled": True, "pretrained": str(folders["clip"]), "embed_dim": CLIP_DIM}
    if spec.get("lora"):
        model["lora"] = {"enabled": True, "r": 2, "alpha": 4}
    return model


def _robot_batch(tokenizer, frames: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    texts = ["pick up the red cube", "push the blue block to the left side"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows])
    mask = torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows])
    action = torch.rand(2, frames, N, A, generator=g) * 2 - 1
    action[..., -1] = (action[..., -1] > 0).float()
    action_mask = torch.ones(2, frames, N, dtype=torch.bool)
    action_mask[1, -1, -1] = False  # an episode end inside the chunk
    return Batch(
        data_source="robot",
        images=torch.randint(0, 256, (2, frames, 3, 40, 40), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.randn(2, frames, S, generator=g),
        action=action,
        action_mask=action_mask,
    )


def _vl_batch(tokenizer, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tokenizer("USER: what is here? ASSISTANT: a red cube", add_special_tokens=False)["input_ids"]])
    labels = ids.clone()
    labels[:, : ids.shape[1] // 2] = IGNORE_INDEX
    return Batch(
        data_source="vl",
        images=torch.randint(0, 256, (1, 1, 3, 40, 40), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=torch.ones_like(ids, dtype=torch.bool),
        text_labels=labels,
    )


@pytest.mark.parametrize("family, rotation", _cases(), ids=[f"{f}-{r}" for f, r in _cases()])
def test_family_trains_with_mechanisms(folders, family, rotation):
    cfg = config_section(ModelConfig, _model_dict(folders, family, rotation), "model")
    torch.manual_seed(0)
    model = build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()
    frames = 2
    robot = model(_robot_batch(model.tokenizer, frames, seed=rotation))
    expected = "loss_action_ce" if cfg.action_space == "discrete" else "loss_arm"
    assert expected in robot and torch.isfinite(robot["loss"]), robot
    if cfg.clip_reg.enabled:
        assert "loss_clip" in robot and torch.isfinite(robot["loss_clip"])
    vl = model(_vl_batch(model.tokenizer, seed=rotation))
    assert torch.isfinite(vl["loss_vl"])
    (robot["loss"] + vl["loss"]).backward()

    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = [n for n, p in trainable.items() if p.grad is None]
    assert not missing, f"no gradient (ZeRO needs the same gradient set on every rank): {missing[:5]}"
    nonzero = {n for n, p in trainable.items() if p.grad.abs().sum() > 0}
    if cfg.action_space == "continuous":
        assert any(n.startswith("action_head.") for n in nonzero)
    if cfg.lora.enabled:
        assert any(".lora_B." in n for n in nonzero)
    if cfg.resampler.enabled:
        assert any(n.startswith("resampler.") for n in nonzero)
    if cfg.use_state:
        assert any(n.startswith("state_encoder.") for n in nonzero)
    if cfg.clip_reg.enabled:
        assert any(n.startswith("clip_reg.") for n in nonzero)
    vision = {id(p) for p in model.adapter.vision_module.parameters()}
    assert any(id(p) in vision and p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())
