"""A real 2-rank DeepSpeed job through launchers/train.sh on CPU, then a resume of the same run; ZeRO-3 + bf16."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.jobs import ROOT, launch, rank_logs, run_ranks
from vla_scale.train.metrics import read_metrics

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


def test_two_rank_job_logs_every_term_and_checkpoints_then_resumes(tmp_path, toy_data, reference_run):
    launch(tmp_path, toy_data, "train.max_steps=4", "train.ckpt_every=2", "wandb.mode=offline")
    run_dir = tmp_path / "runs" / "debug"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()  # rank 0's offline wandb run, kept across the resume
    assert [p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")] == [run_id]
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
    proc = launch(tmp_path, toy_data, "train.max_steps=6", "train.ckpt_every=2", "wandb.mode=offline")
    assert "resumed from" in (proc.stdout + rank_logs(tmp_path))
    assert {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")} == {run_id}
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert (ckpts / "latest").read_text().strip() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]

    # An uninterrupted run sees the same batches and weights, so the same losses (exact data resume). The
    # session's reference run (tests/train/conftest.py) is that run: same config at a constant learning rate,
    # so its first 6 steps are a 6-step run's.
    straight = read_metrics(reference_run.run_dir)[:6]
    assert [r["step"] for r in straight] == [1, 2, 3, 4, 5, 6]
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
    job = run_ranks(
        tmp_path, toy_data, "train.zero_stage=3", "train.bf16=true", "train.max_steps=2", "train.ckpt_every=0"
    )
    # the backbone must not be materialised whole on every rank before DeepSpeed partitions it
    logs = job.logs
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


def test_a_machine_without_gpu_device_files_is_not_asked_for_a_gpu_count(tmp_path):
    """Counting GPUs imports torch, over a second per launch; with no GPU device files the launcher skips it."""
    if any(p.name[len("nvidia") :].isdigit() for p in Path("/dev").glob("nvidia*")) or Path("/dev/kfd").exists():
        pytest.skip("this machine has GPU device files")
    calls = tmp_path / "python_calls.txt"
    wrapper = tmp_path / "python"
    wrapper.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PYTHON": str(wrapper), "VLA_SCALE_DRY_RUN": "1", "CPU_RANKS": "4", "MASTER_PORT": "29555"}
    proc = subprocess.run(
        [str(ROOT / "launchers/train.sh"), str(ROOT / "configs/debug.yaml"), f"run.output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "--num_gpus 4" in proc.stdout, proc.stdout  # CPU_RANKS ranks, as on any machine without GPUs
    assert "import torch" not in calls.read_text()
