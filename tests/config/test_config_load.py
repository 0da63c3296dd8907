"""Config loading: typed schema, overrides, and errors that name the key before anything starts."""

from pathlib import Path

import pytest
import yaml

from vla_scale.config import ConfigError, config_hash, load_config, save_config
from vla_scale.train.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["debug.yaml", "demo_cpu.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(ROOT / "configs" / name)
    assert cfg.model.backbone.family == "llava"
    assert cfg.data.sources and cfg.data.sources[0].path


def test_overrides_nested_and_list_items():
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        ["train.zero_stage=3", "optim.lr=0.5", "data.sources.1.weight=0", "model.backbone.tiny.num_layers=3"],
    )
    assert cfg.train.zero_stage == 3
    assert cfg.optim.lr == 0.5
    assert cfg.data.sources[1].weight == 0.0
    assert cfg.model.backbone.tiny.num_layers == 3


def test_unknown_key_names_it_and_suggests():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.max_step'.*'max_steps'"):
        load_config(ROOT / "configs/debug.yaml", ["train.max_step=5"])


def test_unknown_section_suggests():
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        load_config(None, ["trian.max_steps=5"])


def test_unknown_key_in_yaml_file(tmp_path):
    tree = yaml.safe_load((ROOT / "configs/debug.yaml").read_text())
    tree["model"]["head"]["hiden_size"] = 3
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(tree))
    with pytest.raises(ConfigError, match=r"model\.head\.hiden_size.*'hidden_size'"):
        load_config(path)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.max_steps=ten", r"train\.max_steps: expected an integer"),
        ("train.bf16=1", r"train\.bf16: expected true or false"),
        ("optim.lr=fast", r"optim\.lr: expected a number"),
        ("model.head.arm_loss=l1", r"model\.head\.arm_loss: 'l1' is not one of"),
        ("data.bad_sample_policy=skp", r"Did you mean 'skip'"),
    ],
)
def test_wrong_types_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", [override])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("train.zero_stage=4", r"zero_stage"),
        ("train.global_batch_size=7", r"multiple of train\.micro_batch_size"),
        ("data.sources.0.weight=-1", r"data\.sources\.0\.weight must be >= 0"),
        ("data.window_size=0", r"data\.window_size must be >= 1"),
        ("model.backbone.pretrained=", r"model\.backbone\.pretrained is empty"),
    ],
)
def test_impossible_values(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", [override])


def test_world_size_batch_check_and_ds_config():
    cfg = load_config(ROOT / "configs/debug.yaml")  # global 8, micro 2
    assert build_ds_config(cfg, 2)["gradient_accumulation_steps"] == 2
    assert build_ds_config(cfg, 4)["gradient_accumulation_steps"] == 1
    with pytest.raises(ConfigError, match="micro_batch_size x world"):
        build_ds_config(cfg, 3)
    ds = build_ds_config(load_config(ROOT / "configs/debug.yaml", ["train.zero_stage=3", "train.bf16=true"]), 2)
    assert ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert ds["bf16"]["enabled"] is True
    assert ds["train_batch_size"] == 8


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/debug.yaml", ["optim.lr=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(ROOT / "configs/debug.yaml")) != config_hash(cfg)


def test_exponent_without_dot_is_a_number():
    """YAML 1.1 reads `3e-4` as a string; a float field accepts it as the number it means."""
    assert load_config(ROOT / "configs/debug.yaml", ["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(ROOT / "configs/debug.yaml", ["train.max_steps=1e3"])


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("model.resampler.num_latents=0", r"model\.resampler\.num_latents must be >= 1"),
        ("model.resampler.depth=0", r"model\.resampler\.depth must be >= 1"),
        ("model.resampler.heads=0", r"model\.resampler\.heads must be >= 1"),
        ("model.clip_reg.pretrained=", r"model\.clip_reg\.pretrained is empty"),
        ("model.clip_reg.embed_dim=0", r"model\.clip_reg\.embed_dim must be >= 1"),
        ("model.clip_reg.loss=l2", r"model\.clip_reg\.loss: 'l2' is not one of"),
        ("model.clip_reg.tiny.num_heads=3", r"model\.clip_reg\.tiny\.num_heads \(3\) must be >= 1 and divide"),
        ("model.loss_weights.clip=-1", r"model\.loss_weights\.clip must be >= 0"),
    ],
)
def test_bad_resampler_and_clip_settings_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug_mechanisms.yaml", [override])


def test_mechanisms_config_builds_and_trains_a_step(tmp_path):
    """configs/debug_mechanisms.yaml: resampler + CLIP regulariser, tiny backbone and tiny CLIP written on first use."""
    import torch

    from vla_scale.data.batch import IGNORE_INDEX, Batch
    from vla_scale.model import build_model

    overrides = [f"model.backbone.pretrained={tmp_path}/llava", f"model.clip_reg.pretrained={tmp_path}/clip"]
    cfg = load_config(ROOT / "configs/debug_mechanisms.yaml", overrides)
    assert cfg.model.resampler.enabled and cfg.model.clip_reg.enabled
    model = build_model(cfg.model, action_dim=7, state_dim=8, chunk_size=cfg.data.fwd_pred_next_n)
    assert (tmp_path / "clip" / "config.json").is_file() and model.resampler.num_latents == 4
    ids = model.tokenizer(["pick up the red block"], add_special_tokens=False, return_tensors="pt").input_ids
    batch = Batch(
        data_source="robot",
        images=torch.randint(0, 256, (1, 1, 3, 32, 32), dtype=torch.uint8),
        text_ids=ids,
        text_mask=torch.ones_like(ids, dtype=torch.bool),
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.zeros(1, 1, 8),
        action=torch.zeros(1, 1, 2, 7),
    )
    out = model(batch)
    assert torch.isfinite(out["loss_clip"])
    out["loss"].backward()


# --- history modelling (model.history_type x model.head.type x model.action_space) ---------------------------
@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["model.history_type=pre", "model.head.type=lstm"], r"head\.type=lstm .*needs model\.history_type: post"),
        (["model.history_type=video", "model.head.type=gpt"], r"history_type video .*use model\.head\.type: mlp"),
        (["model.action_space=discrete", "model.head.type=gpt"], r"needs model\.action_space: continuous"),
        (["model.head.type=gpt", "model.head.num_heads=3"], r"model\.head\.num_heads \(3\) must be >= 1 and divide"),
        (["model.head.type=lstm", "model.head.num_layers=0"], r"model\.head\.num_layers must be >= 1"),
        (["model.head.type=gpt", "model.head.max_history=4"], r"max_history \(4\) must equal data\.window_size \(1\)"),
        (["model.history_type=interleaved"], r"model\.history_type: 'interleaved' is not one of"),
    ],
)
def test_impossible_history_combinations_say_what_to_change(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", overrides)


@pytest.mark.parametrize(
    "overrides",
    [
        ["model.history_type=pre", "data.window_size=3"],
        ["model.history_type=pre", "model.action_space=discrete", "data.window_size=2"],
        ["model.history_type=video", "model.action_space=discrete"],
        ["model.history_type=video"],  # window_size 1: one frame, one set of action tokens
        ["model.head.type=lstm", "data.window_size=3", "model.head.max_history=3"],
    ],
)
def test_history_combinations_that_work_load(overrides):
    load_config(ROOT / "configs/debug.yaml", overrides)


def test_history_config_resolves_head_memory_to_the_window(tmp_path):
    cfg = load_config(ROOT / "configs/debug_history.yaml")
    assert (cfg.data.window_size, cfg.model.history_type, cfg.model.head.type) == (2, "post", "gpt")
    assert cfg.model.head.max_history == 2  # 0 in the file: follows data.window_size
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg
    assert load_config(ROOT / "configs/debug_history.yaml", ["data.window_size=4"]).model.head.max_history == 4


def test_every_shipped_config_loads_and_together_they_use_every_mechanism():
    """Each recipe in configs/ is valid, builds a DeepSpeed config for 8 ranks, and each mechanism ships in one."""
    configs = [load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    assert len(configs) >= 9
    for cfg in configs:
        build_ds_config(cfg, 8 if cfg.train.global_batch_size % (8 * cfg.train.micro_batch_size) == 0 else 1)
    models = [c.model for c in configs]
    assert {m.backbone.family for m in models} >= {"llava", "paligemma", "qwen2_5_vl", "kosmos2", "smolvlm"}
    assert {m.action_space for m in models} == {"continuous", "discrete"}
    assert {m.history_type for m in models} == {"post", "pre", "video"}
    assert {m.head.type for m in models} == {"mlp", "lstm", "gpt"}
    assert any(m.use_state for m in models) and any(m.instruction_first for m in models)
    assert any(m.resampler.enabled for m in models) and any(m.clip_reg.enabled for m in models)
    assert any(m.lora.enabled for m in models) and any(c.train.stages for c in configs)
