"""A real 2-rank DeepSpeed job through launchers/train.sh on CPU, then a resume of the same run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from data_tools.synth import synth
from vla_scale.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
TERMS = (
    "loss",
    "loss_arm",
    "loss_gripper",
    "acc_gripper",
    "loss_vl",
    "lr",
    "grad_norm",
    "samples_per_s",
    "tokens_per_s",
)
TERMS += ("data_wait_frac", "skipped_samples", "peak_mem_gb", "mix/synth_tabletop", "mix/synth_vl")

pytestmark = pytest.mark.integration


def launcher_command(tmp_path: Path, data: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    """launchers/train.sh on configs/debug.yaml with the toy data, and its environment (2 CPU ranks, logs per rank)."""
    env = dict(os.environ, PYTHON=sys.executable, RANK_LOG_DIR=str(tmp_path / "rank_logs"), CPU_RANKS="2")
    env["WANDB_MODE"] = "offline"
    env.pop("MASTER_PORT", None)
    cmd = [
        str(ROOT / "launchers/train.sh"),
        str(ROOT / "configs/debug.yaml"),
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.sources.0.path={data / 'robot'}",
        f"data.sources.1.path={data / 'vl'}",
        f"model.backbone.pretrained={tmp_path / 'backbone'}",
        *overrides,
    ]
    return cmd, env


def run_launcher(
    tmp_path: Path, data: Path, *overrides: str, timeout: int = 420, expect_fail: bool = False, env_extra=None
) -> subprocess.CompletedProcess:
    """Start launchers/train.sh and wait; on an unexpected exit code print every rank's log so CI shows why."""
    logs = tmp_path / "rank_logs"
    cmd, env = launcher_command(tmp_path, data, *overrides)
    env.update(env_extra or {})
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"launcher timed out after {timeout}s\n{err.stdout}\n{err.stderr}\n{_rank_logs(logs)}")
    if (proc.returncode != 0) != expect_fail:
        pytest.fail(f"launcher exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}\n{_rank_logs(logs)}")
    return proc


def _rank_logs(folder: Path) -> str:
    if not folder.is_dir():
        return "(no rank logs)"
    return "\n".join(f"===== {p.name} =====\n{p.read_text()[-6000:]}" for p in sorted(folder.glob("*")) if p.is_file())


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth(out, episodes=24, vl_samples=16, image_size=32, seed=0, episodes_per_shard=5)
    return out


def test_two_rank_job_logs_every_term_and_checkpoints_then_resumes(tmp_path, toy_data):
    run_launcher(tmp_path, toy_data, "train.max_steps=4", "train.ckpt_every=2")
    run_dir = tmp_path / "runs" / "debug"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    seen = set().union(*records)
    for term in TERMS:
        assert term in seen, f"{term} missing from metrics.jsonl"
    assert all(r["loss"] == r["loss"] for r in records), "NaN loss"
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000004"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000002", "step_00000004"]
    assert any((ckpts / "step_00000004").rglob("*optim_states.pt")), "DeepSpeed optimizer state missing"
    assert (ckpts / "zero_to_fp32.py").is_file(), "DeepSpeed places its recovery script beside `latest`"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["gradient_accumulation_steps"] == 2 and ds["zero_optimization"]["stage"] == 2
    assert (run_dir / "config.yaml").is_file()

    # Same run directory, longer schedule: resumes at step 4 and continues to 6.
    proc = run_launcher(tmp_path, toy_data, "train.max_steps=6", "train.ckpt_every=2")
    assert "resumed from" in (proc.stdout + _rank_logs(tmp_path / "rank_logs"))
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]

    # An uninterrupted 6-step run sees the same batches and weights, so the same losses (exact data resume).
    run_launcher(tmp_path, toy_data, "train.max_steps=6", "train.ckpt_every=0", "run.name=straight")
    straight = read_metrics(tmp_path / "runs" / "straight")
    for resumed_rec, straight_rec in zip(records[4:], straight[4:], strict=True):
        for term in ("loss", "loss_arm", "loss_gripper", "loss_vl"):
            if term in straight_rec:
                assert resumed_rec[term] == pytest.approx(straight_rec[term], rel=1e-6, abs=1e-7), term


def test_bad_config_fails_before_any_process_starts(tmp_path, toy_data):
    cmd = [str(ROOT / "launchers/train.sh"), str(ROOT / "configs/debug.yaml"), "train.zero_stag=3"]
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "unknown config key 'train.zero_stag'" in proc.stderr and "zero_stage" in proc.stderr
    assert "deepspeed" not in proc.stdout.lower()


def test_zero3_bf16_two_ranks(tmp_path, toy_data):
    """ZeRO stage and bf16 come from the config; ZeRO-3 partitions parameters across the 2 ranks."""
    proc = run_launcher(
        tmp_path, toy_data, "train.zero_stage=3", "train.bf16=true", "train.max_steps=2", "train.ckpt_every=0"
    )
    # the backbone must not be materialised whole on every rank before DeepSpeed partitions it
    logs = proc.stdout + _rank_logs(tmp_path / "rank_logs")
    assert "backbone loaded partitioned by deepspeed.zero.Init: True" in logs
    run_dir = tmp_path / "runs" / "debug"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(0 < r["loss"] < 100 for r in records)
    tag_dir = run_dir / "checkpoints" / "step_00000002"
    shards = sorted(p.name for p in tag_dir.glob("*optim_states.pt"))
    assert len(shards) == 2, f"expected one optimizer partition per rank, got {shards}"
