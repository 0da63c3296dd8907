"""CLIP regulariser: tiny CLIP round trip and EOS pooling, instruction text recovery, the loss, CLIP kept frozen and
out of the module tree, `loss_clip` in RoboVLM outputs (continuous and discrete), zero-touch on VL batches."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import INSTRUCTIONS, discrete_batch, robot_batch, tokenize, vl_batch
from vla_scale.config.schema import BackboneConfig, ClipRegConfig, LossWeightsConfig, ModelConfig, TinyClipConfig
from vla_scale.data.observation import Observation
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.clip_regularizer import (
    ClipRegularizer,
    ClipTextTeacher,
    build_tiny_clip,
    decode_instructions,
    ensure_tiny_clip,
    pool_action_states,
)

E = 16  # tiny CLIP projection width


@pytest.fixture(scope="module")
def clip_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip"
    assert ensure_tiny_clip(ClipRegConfig(enabled=True, pretrained=str(path), embed_dim=E, tiny=TinyClipConfig()))
    return path


def clip_cfg(clip_path, **kw) -> ClipRegConfig:
    return ClipRegConfig(enabled=True, pretrained=str(clip_path), embed_dim=E, **kw)


def make(tiny_path, clip_path, weight: float = 0.5, load_clip: bool = True, **kw) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=False)
    cfg = ModelConfig(
        backbone=backbone, latent_num=2, clip_reg=clip_cfg(clip_path), loss_weights=LossWeightsConfig(clip=weight), **kw
    )
    a, n = (4, 2) if kw.get("action_space") == "discrete" else (7, 3)
    return build_model(cfg, action_dim=a, state_dim=8, chunk_size=n, load_clip=load_clip).train()


def missing_grads(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]


def test_tiny_clip_round_trip_pools_the_eos_position(clip_path, tmp_path):
    built = build_tiny_clip(TinyClipConfig(), E, tmp_path / "again")  # same seed as the fixture's
    loaded = ClipTextTeacher.from_pretrained(str(clip_path))
    a, b = built.model.state_dict(), loaded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not ensure_tiny_clip(ClipRegConfig(pretrained=str(clip_path), tiny=TinyClipConfig()))  # already there
    tok = loaded.tokenizer
    ids = tok("pick up the red block").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id == tok.pad_token_id
    # transformers takes the argmax id instead of the EOS position when eos_token_id == 2 (old checkpoints).
    assert loaded.model.config.eos_token_id == tok.eos_token_id != 2
    device = torch.device("cpu")
    embeds = loaded.embed(INSTRUCTIONS, device)
    assert embeds.shape == (2, E) and not embeds.requires_grad
    torch.testing.assert_close(embeds, built.embed(INSTRUCTIONS, device))
    torch.testing.assert_close(embeds[1:], loaded.embed(INSTRUCTIONS[1:], device), atol=1e-5, rtol=1e-5)  # padding
    with torch.no_grad():
        enc = tok(INSTRUCTIONS[1:], return_tensors="pt")
        out = loaded.model(**enc)
        eos_state = out.last_hidden_state[0, enc.input_ids[0].tolist().index(tok.eos_token_id)]
        torch.testing.assert_close(out.text_embeds[0], loaded.model.text_projection(eos_state))


def test_instruction_text_is_recovered_from_backbone_ids(tiny_built):
    tokenizer = tiny_built[1].tokenizer
    texts = [*INSTRUCTIONS, "Put the blue cup on the plate."]
    for specials in (False, True):
        rows = [tokenizer(t, add_special_tokens=specials).input_ids for t in texts]
        ids = torch.full((3, max(map(len, rows)) + 2), tokenizer.pad_token_id)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
        assert decode_instructions(tokenizer, ids, mask) == texts


def test_pooling_averages_each_samples_action_positions():
    states = torch.arange(2 * 2 * 3 * 1, dtype=torch.float).view(4, 3, 1)  # B=2, T=2 rows each, K=3
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(pool_action_states(states, 2, mask), torch.tensor([[(0 + 3 + 4) / 3], [8.0]]))
    torch.testing.assert_close(pool_action_states(states, 2), states.view(2, 6, 1).mean(1))


@pytest.mark.parametrize("loss", ["cosine", "smooth_l1"])
def test_loss_falls_when_the_projection_is_optimised(clip_path, loss):
    teacher = ClipTextTeacher.from_pretrained(str(clip_path))
    reg = ClipRegularizer(64, clip_cfg(clip_path, loss=loss), teacher)
    texts = [*INSTRUCTIONS, "close the drawer", "push the green button"]
    pooled = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.Adam(reg.parameters(), lr=3e-2)
    first = reg(pooled, texts).item()
    for _ in range(60):
        optimizer.zero_grad()
        value = reg(pooled, texts)
        value.backward()
        optimizer.step()
    assert value.item() < 0.2 * first
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())
    with pytest.raises(ValueError, match=r"set model\.clip_reg\.embed_dim=16"):
        ClipRegularizer(64, ClipRegConfig(enabled=True, embed_dim=8), teacher)


def test_clip_is_frozen_outside_the_module_tree_and_loss_clip_is_weighted(tiny_path, clip_path):
    model = make(tiny_path, clip_path, weight=0.5)
    teacher = model.clip_reg.teacher
    assert teacher is not None and not any(p.requires_grad for p in teacher.model.parameters())
    # Not a submodule: no parameters, state-dict entries, optimizer state or ZeRO partitioning for CLIP.
    proj = ["clip_reg.proj.weight", "clip_reg.proj.bias"]
    assert [n for n, _ in model.named_parameters() if n.startswith("clip_reg.")] == proj
    assert [k for k in model.state_dict() if k.startswith("clip_reg.")] == proj
    assert all(m is not teacher.model for m in model.modules())
    batch = robot_batch(model)
    out = model(batch)
    assert {"loss_clip", "loss_arm", "loss_gripper"} <= set(out) and 0 < out["loss_clip"].item() <= 2  # cosine
    w = model.cfg.loss_weights
    expected = w.arm * out["loss_arm"] + w.gripper * out["loss_gripper"] + 0.5 * out["loss_clip"]
    torch.testing.assert_close(out["loss"], expected)
    # The pooled action states are what the regulariser sees: recompute the term by hand.
    _, _, action_hidden, _ = model.actions.outputs(model, Observation(batch.images, batch.text_ids, batch.text_mask))
    target = teacher.embed(INSTRUCTIONS, torch.device("cpu"))
    manual = model.clip_reg.loss(model.clip_reg.proj(pool_action_states(action_hidden, 2)), target)
    torch.testing.assert_close(out["loss_clip"], manual)
    out["loss"].backward()
    assert missing_grads(model) == [] and model.clip_reg.proj.weight.grad.abs().sum() > 0
    assert model.action_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())


def test_discrete_action_positions_are_regularised_too(tiny_path, clip_path):
    model = make(tiny_path, clip_path, weight=1.0, action_space="discrete")
    out = model(discrete_batch(model))
    assert "loss_clip" in out and torch.isfinite(out["loss_clip"])
    torch.testing.assert_close(out["loss"], out["loss_action_ce"] + out["loss_clip"])
    out["loss"].backward()
    assert missing_grads(model) == [] and model.clip_reg.proj.weight.grad.abs().sum() > 0


def test_vl_batch_touches_the_projection_without_a_clip_term(tiny_path, clip_path):
    model = make(tiny_path, clip_path)
    out = model(vl_batch(model))
    assert "loss_clip" not in out
    out["loss"].backward()
    assert missing_grads(model) == []  # the same gradient set as a robot batch (ZeRO)
    assert model.clip_reg.proj.weight.grad.abs().sum() == 0


def test_inference_build_skips_clip_and_loads_the_same_weights(tiny_path, clip_path):
    trained = make(tiny_path, clip_path)
    policy = make(tiny_path, clip_path, load_clip=False)
    assert policy.clip_reg.teacher is None
    policy.load_state_dict(trained.state_dict(), strict=True)
    batch = robot_batch(policy)
    ids, mask = tokenize(policy, INSTRUCTIONS)
    obs = Observation(batch.images, ids, mask)
    arm, _ = policy.predict_action(obs)
    torch.testing.assert_close(arm, trained.predict_action(obs)[0])
    with pytest.raises(RuntimeError, match="load_clip=False"):
        policy(batch)


def test_teacher_loads_whole_while_zero3_integration_is_alive(clip_path):
    """Under ZeRO-3 the training loop keeps an HfDeepSpeedConfig alive so the backbone loads partitioned; the teacher
    is outside the engine, so it must not be (zero.Init would also need a process group, which this test has not)."""
    from transformers.integrations import HfDeepSpeedConfig, is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    ds = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert is_deepspeed_zero3_enabled()
        teacher = ClipTextTeacher.from_pretrained(str(clip_path))
        assert is_deepspeed_zero3_enabled()  # restored for whatever loads next
        assert not any(hasattr(p, "ds_id") for p in teacher.model.parameters())
        assert teacher.embed(INSTRUCTIONS, torch.device("cpu")).shape == (2, E)
    finally:
        unset_hf_deepspeed_config()
        del ds
