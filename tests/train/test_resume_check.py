"""check_same_run: the one answer to "may this job join this run directory?" (no process group needed)."""

import json
from pathlib import Path

import pytest
import yaml

from vla_scale.config import ConfigError, load_config, save_config
from vla_scale.train import checkpoint
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.resume_check import check_same_run

ROOT = Path(__file__).resolve().parents[2]


def _cfg(tmp_path: Path, *extra: str):
    return load_config(ROOT / "configs/debug.yaml", [f"run.output_dir={tmp_path / 'runs'}", *extra])


def _prepared(tmp_path: Path, world: int = 2, *extra: str) -> Path:
    """A run directory as prepare leaves it: config.yaml and ds_config.json (no data or backbone needed here)."""
    cfg = _cfg(tmp_path, *extra)
    run_dir = tmp_path / "runs" / cfg.run.name
    run_dir.mkdir(parents=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(build_ds_config(cfg, world)))
    return run_dir


def _checkpoint(run_dir: Path, world: int, stage: int = 0) -> None:
    """What checkpoint.save leaves for read_meta: a tag folder with our meta file and the `latest` pointer."""
    tag = checkpoint.tag_for(4)
    (run_dir / "checkpoints" / tag).mkdir(parents=True, exist_ok=True)
    meta = {"step": 4, "stage": stage, "world_size": world}
    (run_dir / "checkpoints" / tag / checkpoint.META).write_text(json.dumps(meta))
    (run_dir / "checkpoints" / checkpoint.LATEST).write_text(tag)


def test_fresh_directory_is_a_new_run_unless_it_must_be_prepared(tmp_path):
    cfg = _cfg(tmp_path)
    check_same_run(tmp_path / "runs" / "debug", cfg, 2)
    with pytest.raises(ConfigError, match=r"config\.yaml does not exist.*vla-scale prepare"):
        check_same_run(tmp_path / "runs" / "debug", cfg, 2, prepared=True)


def test_batch_that_does_not_split_over_the_ranks_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"micro_batch_size x world size \(2 x 3\)"):
        check_same_run(tmp_path / "runs" / "debug", _cfg(tmp_path), 3)


def test_resumable_keys_may_change_others_may_not(tmp_path):
    run_dir = _prepared(tmp_path)
    check_same_run(run_dir, _cfg(tmp_path, "train.max_steps=99", "debug.save_pause_s=5"), 2, prepared=True)
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.5.*new run\.name"):
        check_same_run(run_dir, _cfg(tmp_path, "optim.lr=0.5"), 2)
    # nodes joining node 0's run must match in every key, resumable ones included
    with pytest.raises(ConfigError, match=r"train\.max_steps.*start every node alike"):
        check_same_run(run_dir, _cfg(tmp_path, "train.max_steps=99"), 2, exact=True, prepared=True)


def test_a_run_from_before_a_key_existed_resumes_while_the_key_keeps_its_default(tmp_path):
    """After an upgrade the saved config.yaml lacks the keys added since (here `data.storage.fetch_process`)."""
    run_dir = _prepared(tmp_path)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    del saved["data"]["storage"]["fetch_process"]
    (run_dir / "config.yaml").write_text(yaml.safe_dump(saved))
    check_same_run(run_dir, _cfg(tmp_path, "train.max_steps=99"), 2, prepared=True)
    with pytest.raises(ConfigError, match=r"data\.storage\.fetch_process: \(absent\) -> False"):
        check_same_run(run_dir, _cfg(tmp_path, "data.storage.fetch_process=false"), 2)  # set otherwise: another run
    with pytest.raises(ConfigError, match=r"data\.storage\.fetch_process: \(absent\) -> True"):
        check_same_run(run_dir, _cfg(tmp_path), 2, exact=True, prepared=True)  # nodes must run the same code


def test_ds_config_prepared_for_another_world_size_is_refused(tmp_path):
    run_dir = _prepared(tmp_path, world=2)
    check_same_run(run_dir, _cfg(tmp_path), 1)  # prepare may re-lay a run out for another size...
    with pytest.raises(ConfigError, match="another world size than this job's 1 ranks"):
        check_same_run(run_dir, _cfg(tmp_path), 1, prepared=True)  # ...ranks may not start on a stale one


def test_checkpoint_of_another_world_size_or_a_dropped_stage_is_refused(tmp_path):
    run_dir = _prepared(tmp_path, world=2)
    _checkpoint(run_dir, world=2)
    check_same_run(run_dir, _cfg(tmp_path), 2, prepared=True)
    with pytest.raises(ConfigError, match="written by 2 ranks and this job has 1"):
        check_same_run(run_dir, _cfg(tmp_path), 1)
    _checkpoint(run_dir, world=2, stage=1)
    with pytest.raises(ConfigError, match="written in stage 1 but train.stages now lists 1"):
        check_same_run(run_dir, _cfg(tmp_path), 2)


def test_config_yaml_cut_short_is_named_not_a_parser_traceback(tmp_path):
    run_dir = _prepared(tmp_path, world=2)
    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(text[: text.index("model:") + 30] + "\n  'unclosed")
    with pytest.raises(ConfigError, match=r"config\.yaml is not readable YAML .*cut short by a kill"):
        check_same_run(run_dir, _cfg(tmp_path), 2)
