"""Parameter groups of the unfreezing schedule resolved on a real tiny RoboVLM, and the schedule itself."""

from pathlib import Path

import pytest

from vla_scale.config import ConfigError, load_config
from vla_scale.model import build_model
from vla_scale.train.stages import apply_stage, group_parameters, resolve_stages, stage_at

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, *overrides: str):
    return load_config(
        ROOT / "configs/debug.yaml",
        [f"model.backbone.pretrained={tmp_path / 'backbone'}", "model.use_state=true", *overrides],
    )


@pytest.fixture(scope="module")
def model_and_cfg(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stages")
    cfg = _config(tmp, "model.lora.enabled=true", "model.backbone.tiny.num_layers=2")
    return build_model(cfg.model, action_dim=7, state_dim=7, chunk_size=cfg.data.fwd_pred_next_n), cfg, tmp


def test_groups_partition_the_model_sensibly(model_and_cfg):
    model, _, _ = model_and_cfg
    names = {n for n, _ in model.named_parameters()}
    heads = group_parameters(model, "heads")
    assert heads == {n for n in names if not n.startswith("adapter.")}
    assert "action_token" in heads and any(n.startswith("state_encoder.") for n in heads)
    lora = group_parameters(model, "lora")
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    vision, decoder = group_parameters(model, "vision"), group_parameters(model, "decoder")
    assert vision and all("vision_tower" in n for n in vision)
    assert decoder and not decoder & lora and not decoder & vision
    last = group_parameters(model, "decoder_last_1")
    assert last < decoder and all(".layers.1." in n for n in last)
    lm = group_parameters(model, "language_model")
    assert decoder <= lm and group_parameters(model, "lm_head") <= lm and not lm & vision
    assert group_parameters(model, "all") == names
    assert group_parameters(model, "re:action_head\\.arm") == {"action_head.arm.weight", "action_head.arm.bias"}


def test_default_stage_with_lora_trains_heads_and_adapters_only(model_and_cfg):
    model, cfg, _ = model_and_cfg
    (stage,) = resolve_stages(model, cfg)
    count = apply_stage(model, stage)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == group_parameters(model, "heads") | group_parameters(model, "lora")
    assert count == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_schedule_picks_the_stage_for_each_step(model_and_cfg):
    model, _, tmp = model_and_cfg
    cfg = _config(
        tmp,
        "train.stages=[{start_step: 0, trainable: [heads]}, {start_step: 3, trainable: [heads, decoder_last_1]},"
        " {start_step: 5, trainable: [all], lr_scale: 0.1}]",
    )
    stages = resolve_stages(model, cfg)
    assert [stage_at(stages, s).index for s in range(7)] == [0, 0, 0, 1, 1, 2, 2]
    assert stages[2].lr_scale == 0.1 and stages[0].trainable < stages[1].trainable < stages[2].trainable


def test_groups_that_select_nothing_fail_before_training(model_and_cfg):
    model, _, tmp = model_and_cfg
    cfg = _config(tmp, "train.stages=[{start_step: 0, trainable: ['re:no_such_parameter']}]")
    with pytest.raises(ConfigError, match="selects no parameter"):
        resolve_stages(model, cfg)
    cfg = _config(tmp, "train.stages=[{start_step: 0, trainable: [decoder_last_9]}]")
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        resolve_stages(model, cfg)


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stages=[{start_step: 2, trainable: [all]}]", "must be 0"),
        ("train.stages=[{start_step: 0, trainable: [all]}, {start_step: 0, trainable: [heads]}]", "greater than"),
        ("train.stages=[{start_step: 0, trainable: [visoin]}]", "Did you mean 'vision'"),
        ("train.stages=[{start_step: 0, trainable: [lora]}]", "model.lora.enabled is false"),
        ("train.stages=[{start_step: 0, trainable: [all], lr_scale: 0}]", "lr_scale must be > 0"),
        ("train.offload_optimizer=true", "needs ZeRO"),  # debug.yaml's ZeRO stage is overridden below
        ("train.offload_params=true", "needs ZeRO-3"),
        ("train.fp16=true", "pick one precision"),
        ("model.lora.r=0", "r >= 1"),
    ],
)
def test_bad_engine_configs_are_refused_at_load(tmp_path, override, message):
    extra = ["model.lora.enabled=true"] if override.startswith("model.lora") else []
    extra += ["train.zero_stage=0"] if "offload_optimizer" in override else []
    extra += ["train.bf16=true"] if "fp16" in override else []
    with pytest.raises(ConfigError, match=message):
        _config(tmp_path, override, *extra)


def test_apply_stage_sets_requires_grad_exactly(model_and_cfg):
    model, _, tmp = model_and_cfg
    cfg = _config(tmp, "train.stages=[{start_step: 0, trainable: [heads, decoder_last_1]}]")
    (stage,) = resolve_stages(model, cfg)
    apply_stage(model, stage)
    frozen = [p for n, p in model.named_parameters() if n not in stage.trainable]
    assert frozen and all(not p.requires_grad for p in frozen)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(stage.trainable)
