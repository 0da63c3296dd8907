"""Config loading: typed schema, overrides, and errors that name the key before anything starts."""

from pathlib import Path

import pytest
import yaml

from vla_scale.config import ConfigError, load_config
from vla_scale.train.ds_config import build_ds_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["debug.yaml", "demo_cpu.yaml", "instruct_cpu.yaml", "metaworld_cpu.yaml"])
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


def test_exponent_without_dot_is_a_number():
    """YAML 1.1 reads `3e-4` as a string; a float field accepts it as the number it means."""
    assert load_config(ROOT / "configs/debug.yaml", ["optim.lr=3e-4"]).optim.lr == 3e-4
    with pytest.raises(ConfigError, match="expected an integer"):
        load_config(ROOT / "configs/debug.yaml", ["train.max_steps=1e3"])


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


def test_every_shipped_config_loads_and_together_they_use_every_mechanism():
    """Each recipe in configs/ is valid, builds a DeepSpeed config for 8 ranks, and each mechanism ships in one."""
    configs = [load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))]
    assert len(configs) >= 9
    for cfg in configs:
        build_ds_config(cfg, 8 if cfg.train.global_batch_size % (8 * cfg.train.micro_batch_size) == 0 else 1)
    models = [c.model for c in configs]
    assert {m.backbone.family for m in models} >= {"llava", "paligemma", "qwen2_5_vl", "kosmos2", "smolvlm"}
    assert {m.action_space for m in models} == {"continuous", "discrete", "parallel", "flow"}
    assert {m.history_type for m in models} == {"post", "pre", "video"}
    assert {m.head.type for m in models} == {"mlp", "lstm", "gpt"}
    assert any(m.use_state for m in models) and any(m.instruction_first for m in models)
    assert any(m.resampler.enabled for m in models) and any(m.clip_reg.enabled for m in models)
    assert any(m.lora.enabled for m in models) and any(c.train.stages for c in configs)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("data.sources.5.weight=1", r"override data\.sources\.5\.weight: list data\.sources has only 2 items"),
        ("train.stages.0.start_step=0", r"list train\.stages has only 0 items; it is empty: set the whole list"),
        ("optim.lr.x=1", r"override optim\.lr\.x: optim\.lr is 0\.001, not a section"),
        ("train.max_steps", r"override 'train\.max_steps' must look like section\.key=value"),
        ("data.sources.\u00b2.path=x", r"override data\.sources\.\u00b2\.path: list data\.sources has only 2 items"),
    ],
)
def test_overrides_that_cannot_apply_say_why(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(ROOT / "configs/debug.yaml", [override])


def test_override_value_that_is_not_yaml_is_kept_as_text():
    cfg = load_config(ROOT / "configs/debug.yaml", ["run.name=@night", "data.sources=[{path: a}]"])
    assert cfg.run.name == "@night"
    assert [s.path for s in cfg.data.sources] == ["a"]


@pytest.mark.parametrize(
    "text, where, pattern",
    [
        ("run:\n  name: a\n data:\n  window_size: 2\n", r":3:2: YAML syntax error", r"expected <block end>"),
        ("run: {name: a\n", r":2:1: YAML syntax error", r"flow mapping"),
        ("run:\n  name: 'a\n", r":3:1: YAML syntax error", r"quoted scalar"),
        ("run:\n\tname: a\n", r":2:1: YAML syntax error", r"found character '\\t'.*spaces, not tabs"),
    ],
)
def test_yaml_syntax_error_names_file_line_and_column(tmp_path, text, where, pattern):
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"broken\.yaml{where}.*{pattern}") as err:
        load_config(path)
    assert err.value.__cause__ is None and "fix the file at that line and column" in str(err.value)


def test_yaml_file_that_is_not_a_mapping_says_so(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- run\n- data\n")
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of sections .*got list"):
        load_config(path)
