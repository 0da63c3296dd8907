"""Is this the same run? `config_hash` of the resolved config and `config_diff` between two configs."""

from pathlib import Path

import yaml

from vla_scale.config import config_diff, config_hash, load_config, save_config, to_dict
from vla_scale.config.compare import RESUMABLE_CHANGES

ROOT = Path(__file__).resolve().parents[2]
DEBUG_YAML = ROOT / "configs/debug.yaml"


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(ROOT / "configs/debug.yaml", ["optim.lr=0.25"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(ROOT / "configs/debug.yaml")) != config_hash(cfg)


def test_hash_is_stable_and_covers_every_key():
    cfg = load_config(DEBUG_YAML)
    assert config_hash(cfg) == config_hash(load_config(DEBUG_YAML)) == config_hash(to_dict(cfg))
    assert len(config_hash(cfg)) == 16
    assert config_hash(load_config(DEBUG_YAML, ["train.max_steps=99"])) != config_hash(cfg)  # resumable, still hashed


def test_diff_of_equal_configs_is_empty():
    assert config_diff(load_config(DEBUG_YAML), load_config(DEBUG_YAML)) == []


def test_diff_names_each_changed_key_with_old_and_new_value():
    a = load_config(DEBUG_YAML)
    b = load_config(DEBUG_YAML, ["optim.lr=0.5", "data.sources.1.weight=0", "model.backbone.tiny.num_layers=3"])
    assert config_diff(a, b) == [
        f"data.sources.1.weight: {a.data.sources[1].weight!r} -> 0.0",
        f"model.backbone.tiny.num_layers: {a.model.backbone.tiny.num_layers!r} -> 3",
        f"optim.lr: {a.optim.lr!r} -> 0.5",
    ]
    assert config_diff(b, a)[-1] == f"optim.lr: 0.5 -> {a.optim.lr!r}"


def test_diff_ignores_what_a_resume_may_change_unless_told_not_to():
    a = load_config(DEBUG_YAML)
    resumed = load_config(
        DEBUG_YAML,
        ["train.max_steps=99", "train.log_every=5", "train.ckpt_every=7", "train.keep_last=9", "wandb.mode=disabled"]
        + ["debug.inject_nan=loss@2", "debug.save_pause_s=3", "train.zero_stage=3", "train.process_group_timeout_s=7"],
    )
    assert config_diff(a, resumed) == [f"train.zero_stage: {a.train.zero_stage} -> 3"]
    everything = config_diff(a, resumed, ignore=())
    assert len(everything) == 9
    assert "debug.inject_nan: '' -> 'loss@2'" in everything
    assert f"train.max_steps: {a.train.max_steps} -> 99" in everything
    assert {"train.max_steps", "wandb", "debug"} <= set(RESUMABLE_CHANGES)


def test_diff_against_a_saved_config_file_and_across_list_lengths(tmp_path):
    """A saved config.yaml read as plain YAML compares like a Config; a longer list shows the added item."""
    a = load_config(DEBUG_YAML)
    save_config(a, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert config_diff(saved, a) == []
    del saved["debug"]  # written before the debug: section existed
    assert config_diff(saved, a) == []
    assert (
        config_diff(saved, a, ignore=())[0]
        == "debug: (absent) -> {'inject_nan': '', 'save_pause_s': 0.0, 'shm_allreduce': False}"
    )
    one = "{start_step: 0, trainable: [heads]}"
    more = load_config(DEBUG_YAML, [f"train.stages=[{one}, {{start_step: 4}}]"])
    assert config_diff(a, more)[0].startswith("train.stages: [] -> [{'start_step': 0, 'trainable': ['heads']")
    two = load_config(DEBUG_YAML, ["train.stages=[{start_step: 0}, {start_step: 4}]"])
    assert config_diff(more, two) == ["train.stages.0.trainable.0: 'heads' -> 'all'"]
    assert config_diff(two, load_config(DEBUG_YAML, ["train.stages=[{start_step: 0}]"])) == [
        "train.stages.1: {'start_step': 4, 'trainable': ['all'], 'lr_scale': 1.0} -> (absent)"
    ]
