"""The prepare step: everything that can be checked before a process group exists."""

import json
import subprocess
import sys
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
    own = f"model.backbone.pretrained={tmp_path / 'backbone'}"  # not the session's shared one: written here
    run_dir = prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, "optim.lr=0.01", own), world_size=2)
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


def _prepare(tmp_path: Path, data: Path, *extra: str, world_size: int = 2) -> Path:
    return prepare_run(ROOT / "configs/debug.yaml", overrides(tmp_path, data, *extra), world_size=world_size)


@pytest.mark.parametrize(
    "extra, pattern",
    [
        (
            ("data.fwd_pred_next_n=500",),
            r"data\.fwd_pred_next_n \(500\) is longer than every episode of the robot sources \(the longest has "
            r"(\d+) steps\).*set data\.fwd_pred_next_n to at most \1$",
        ),
        (
            ("data.window_size=400",),
            r"data\.window_size \(400\) is longer than every episode of data\.sources\.0 \(.*robot: the longest has "
            r"(\d+) steps\).*set data\.window_size to at most \1 or remove the source$",
        ),
        (
            ("data.sources.0.weight=0",),
            r"data\.sources\.0\.weight is 0: the robot dataset .*robot would never be drawn.*remove it from "
            r"data\.sources instead",
        ),
        (
            ("model.action_space=discrete", "model.discrete.n_bin=100000"),
            r"model\.discrete\.n_bin \(100000\) must be smaller than the LM vocabulary \(\d+ tokens\).*\(the tokenizer "
            r"of /\S+\); "
            r"lower model\.discrete\.n_bin",
        ),
    ],
    ids=["chunk-longer-than-every-episode", "window-longer-than-every-episode", "robot-weight-0", "n_bin-over-vocab"],
)
def test_configs_the_data_or_backbone_cannot_train_are_refused_before_anything_is_written(
    tmp_path, data, extra, pattern
):
    with pytest.raises(ConfigError, match=pattern):
        _prepare(tmp_path, data, *extra)
    assert not (tmp_path / "runs").exists()


def test_a_chunk_as_long_as_the_longest_episode_and_a_small_n_bin_are_accepted(tmp_path, data):
    longest = max(s["max_length"] for s in json.loads((data / "robot" / "manifest.json").read_text())["shards"])
    _prepare(tmp_path, data, f"data.fwd_pred_next_n={longest}", "model.action_space=discrete", "model.discrete.n_bin=8")


def test_stage_after_max_steps_is_reported_not_refused(tmp_path, data, capsys):
    """A staged run may stop early and resume with a larger train.max_steps, so a late stage is allowed, but said."""
    _prepare(tmp_path, data, "train.stages=[{start_step: 0}, {start_step: 2}, {start_step: 50}]")
    err = capsys.readouterr().err
    assert "note: train.stages.2.start_step (50) is not below train.max_steps (4)" in err
    assert "train.stages.1" not in err


def _copy_dataset(data: Path, tmp_path: Path) -> Path:
    import shutil

    robot = tmp_path / "robot_copy"
    shutil.copytree(data / "robot", robot)
    return robot


def test_manifest_that_is_not_json_names_the_file(tmp_path, data):
    robot = _copy_dataset(data, tmp_path)
    (robot / "manifest.json").write_text('{"name": "cut short", "shards": [')
    with pytest.raises(
        ConfigError, match=r"data\.sources\.0\.path: .*robot_copy/manifest\.json is not JSON \(.*line 1"
    ):
        _prepare(tmp_path, data, f"data.sources.0.path={robot}")


@pytest.mark.parametrize(
    "stat, value, pattern",
    [
        ("std", float("nan"), r"stats\.json: action\.std has nan at dimension 1; recompute it"),
        ("mean", float("inf"), r"stats\.json: action\.mean has inf at dimension 1; recompute it"),
    ],
)
def test_stats_with_non_finite_values_name_the_key_and_dimension(tmp_path, data, stat, value, pattern):
    robot = _copy_dataset(data, tmp_path)
    stats = json.loads((robot / "stats.json").read_text())
    stats["action"][stat][1] = value
    (robot / "stats.json").write_text(json.dumps(stats))  # json writes NaN / Infinity, as numpy-based tools do
    with pytest.raises(ConfigError, match=rf"data\.sources\.0\.path: .*robot_copy/{pattern}"):
        _prepare(tmp_path, data, f"data.sources.0.path={robot}")


def test_stats_with_zero_std_are_reported_and_normalised_with_std_one(tmp_path, data, capsys):
    robot = _copy_dataset(data, tmp_path)
    stats = json.loads((robot / "stats.json").read_text())
    stats["action"]["std"][1] = 0.0
    stats["state"]["std"][0] = 1e-9
    (robot / "stats.json").write_text(json.dumps(stats))
    _prepare(tmp_path, data, f"data.sources.0.path={robot}")
    err = capsys.readouterr().err
    assert "note: data.sources.0 (" in err and "action dimension(s) [1] are constant" in err
    assert "state dimension(s) [0] are constant" in err and "normalised with std 1" in err


def test_resume_at_another_world_size_is_refused_before_the_run_dir_is_touched(tmp_path, data):
    run_dir = _prepare(tmp_path, data)
    ckpt = run_dir / "checkpoints" / "step_00000002"
    ckpt.mkdir(parents=True)
    (ckpt / "vla_scale_state.json").write_text(json.dumps({"step": 2, "stage": 0, "world_size": 2}))
    (run_dir / "checkpoints" / "latest").write_text(ckpt.name)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "ds_config.json")}
    for world_size in (4, 1):
        with pytest.raises(
            ConfigError, match=rf"written by 2 ranks and this job has {world_size}; resume with the same"
        ):
            _prepare(tmp_path, data, world_size=world_size)
        assert {name: (run_dir / name).read_bytes() for name in before} == before
    _prepare(tmp_path, data, "train.max_steps=8")  # the same world size resumes, with a longer schedule


def test_run_dir_files_are_replaced_atomically_a_kill_mid_write_leaves_the_old_ones(tmp_path, data):
    """A real SIGKILL while prepare writes ds_config.json (after its bytes are out, before the rename)."""
    import subprocess
    import sys

    run_dir = _prepare(tmp_path, data)
    before = {name: (run_dir / name).read_bytes() for name in ("config.yaml", "ds_config.json")}
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from vla_scale.train.prepare import prepare_run\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if str(dst).endswith('ds_config.json'):\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    real(src, dst)\n"
        "os.replace = replace\n"
        "prepare_run(sys.argv[1], sys.argv[2:], world_size=2)\n"
    )
    cmd = [
        sys.executable,
        "-c",
        script,
        str(ROOT / "configs/debug.yaml"),
        *overrides(tmp_path, data, "train.max_steps=9"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["max_steps"] == 9  # replaced whole
    assert (run_dir / "ds_config.json").read_bytes() == before["ds_config.json"]  # the old one, whole
    stray = {p.name for p in run_dir.glob(".*.tmp")}
    assert len(stray) == 1 and stray.pop().startswith(".ds_config.json."), "the kill leaves one stray temp file"
    _prepare(tmp_path, data, "train.max_steps=9")  # and the run directory still prepares, leaving no temp file
    assert len(list(run_dir.glob(".*.tmp"))) == 1


def test_robot_sources_with_different_declared_spaces_are_refused(tmp_path, data):
    """One model trains on every robot source: a set whose gripper is regressed cannot join one where it is binary."""
    robot = _copy_dataset(data, tmp_path)
    manifest = json.loads((robot / "manifest.json").read_text())
    manifest["spaces"]["action"]["binary"] = []
    (robot / "manifest.json").write_text(json.dumps(manifest))
    sources = f"data.sources=[{{path: {data / 'robot'}}}, {{path: {robot}}}, {{path: {data / 'vl'}}}]"
    with pytest.raises(
        ConfigError,
        match=rf"robot datasets {data / 'robot'} \(synth_tabletop\) and {robot} \(synth_tabletop\) declare different "
        r"action/state spaces \(action binary dims \[3\] vs \[\]\).*--binary-gripper-dims",
    ):
        _prepare(tmp_path, data, sources)
    assert not (tmp_path / "runs").exists()
    # The same layout declared or not (a legacy manifest) trains together.
    del manifest["spaces"]
    (robot / "manifest.json").write_text(json.dumps(manifest))
    _prepare(tmp_path, data, sources)


def test_prepare_and_run_dir_do_not_import_torch():
    """Every launch runs them once before any rank starts; torch's import would add ~1 s of CPU to each."""
    probe = "import sys, vla_scale.cli, vla_scale.train.prepare, vla_scale.train.run_dir; print(sorted(" \
            "m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'deepspeed')))"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout[:2000]
