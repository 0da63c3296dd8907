"""The prepare step: everything that can be checked before a process group exists."""

import json
from pathlib import Path

import pytest
import yaml

from data_tools.synth import synth
from tests.train.jobs import debug_overrides as overrides
from vla_scale.cli import main as cli_main
from vla_scale.config import ConfigError
from vla_scale.train.prepare import prepare_run

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth(out, episodes=6, vl_samples=4, image_size=32, episodes_per_shard=3, progress=False)
    return out


def test_prepare_writes_resolved_config_ds_json_and_tiny_backbone(tmp_path, data):
    run_dir = prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, "optim.lr=0.01"), world_size=2)
    assert run_dir == tmp_path / "runs" / "debug"
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["optim"]["lr"] == 0.01
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert (tmp_path / "backbone" / "config.json").is_file()


def test_reusing_a_run_dir_with_a_different_setting_is_refused(tmp_path, data):
    prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data), world_size=2)
    prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, "train.max_steps=9"), world_size=2)
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.5.*new run\.name"):
        prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, "optim.lr=0.5"), world_size=2)


def test_world_size_that_cannot_keep_the_global_batch_is_refused(tmp_path, data):
    with pytest.raises(ConfigError, match=r"micro_batch_size x world size \(2 x 3\)"):
        prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data), world_size=3)


def test_missing_dataset_and_unknown_family_name_the_key(tmp_path, data):
    bad = overrides(tmp_path, data) + [f"data.sources.1.path={tmp_path / 'nothing'}"]
    with pytest.raises(ConfigError, match=r"data\.sources\.1\.path: .*not a vla_scale dataset"):
        prepare_run(ROOT / "configs/debug.yaml", bad, world_size=2)
    with pytest.raises(ConfigError, match=r"model\.backbone\.family.*'lava'.*Did you mean 'llava'"):
        prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, "model.backbone.family=lava"), 2)


def test_vl_only_sources_are_refused(tmp_path, data):
    only_vl = overrides(tmp_path, data) + [f"data.sources.0.path={data / 'vl'}"]
    with pytest.raises(ConfigError, match="no robot dataset"):
        prepare_run(ROOT / "configs/debug.yaml", only_vl, world_size=2)


def test_cli_prepare_prints_run_dir_and_reports_config_errors(tmp_path, data, capsys):
    assert cli_main(["prepare", str(ROOT / "configs/debug.yaml"), *overrides(tmp_path, data), "--world-size", "2"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "runs" / "debug")
    assert cli_main(["prepare", str(ROOT / "configs/debug.yaml"), "optim.lrr=1"]) == 2
    assert "unknown config key 'optim.lrr'" in capsys.readouterr().err
