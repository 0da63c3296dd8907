"""Preemption: a signal makes every rank finish its step, save, and exit 75; the resumed run is exact.

The uninterrupted run to compare with is the session's reference run (tests/train/conftest.py): configs/debug.yaml,
nodes.MAX_STEPS steps at a constant learning rate, 2 ranks, fp32.
"""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from tests.train.jobs import rank_logs, run_ranks, start_launcher
from tests.train.nodes import MAX_STEPS
from vla_scale.config import ConfigError, load_config
from vla_scale.train.checkpoint import read_latest, tag_for
from vla_scale.train.export import load_fp32_state_dict
from vla_scale.train.metrics import read_metrics
from vla_scale.train.preempt import EXIT_PREEMPTED, Preemption

ROOT = Path(__file__).resolve().parents[2]
LOSSES = ("loss", "loss_arm", "loss_gripper", "loss_vl")


def test_handler_counts_signals_and_agreement_without_a_process_group():
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        p = Preemption("SIGUSR1")
        assert not p.agreed()
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second signal only counts
        assert p.seen == 2 and p.agreed()
        assert not Preemption("none").agreed()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_preempt_signal_is_checked_by_the_config():
    assert load_config(ROOT / "configs/debug.yaml", []).train.preempt_signal == "SIGTERM"
    with pytest.raises(ConfigError, match="preempt_signal"):
        load_config(ROOT / "configs/debug.yaml", ["train.preempt_signal=SIGHUP"])


def _step(run_dir: Path) -> int:
    records = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
    return records[-1]["step"] if records else 0


@pytest.mark.integration
def test_signal_mid_step_and_during_the_save_resume_exactly(tmp_path, toy_data, reference_run):
    common = (f"train.max_steps={MAX_STEPS}", "train.ckpt_every=0")
    run_dir = tmp_path / "runs" / "debug"
    ckpts = run_dir / "checkpoints"

    # 1) SIGTERM to rank 1 only, mid-run: both ranks stop at the same step, save it and exit 75.
    sent = []

    def sigterm_rank1(procs) -> None:
        if not sent and _step(run_dir) >= 3:
            os.kill(procs[1].pid, signal.SIGTERM)
            sent.append(_step(run_dir))

    job = run_ranks(tmp_path, toy_data, *common, expect_fail=True, during=sigterm_rank1)
    assert job.returncodes == [EXIT_PREEMPTED] * 2, job.logs
    first = int(read_latest(ckpts).removeprefix("step_"))
    assert sent and sent[0] <= first < MAX_STEPS  # the step in flight (or the next) when the signal came
    assert _step(run_dir) == first and "preempted (SIGTERM)" in job.logs

    # 2) SIGUSR1 (configured) to rank 0, then again to every process of both ranks while they are held inside
    # the preemption save (debug.save_pause_s): the save completes and `latest` names it.
    state = {"first": False, "second": False}

    def sigusr1_twice(procs) -> None:
        if not state["first"] and _step(run_dir) >= first + 2:
            os.kill(procs[0].pid, signal.SIGUSR1)
            state["first"] = True
        elif state["first"] and not state["second"] and "pausing" in rank_logs(tmp_path):
            for proc in procs:
                os.killpg(proc.pid, signal.SIGUSR1)  # as SLURM signals a job step: every process
            state["second"] = True

    extra = ("train.preempt_signal=SIGUSR1", "debug.save_pause_s=6")
    job = run_ranks(tmp_path, toy_data, *common, *extra, expect_fail=True, during=sigusr1_twice)
    assert job.returncodes == [EXIT_PREEMPTED] * 2 and state["second"], job.logs
    second = int(read_latest(ckpts).removeprefix("step_"))
    assert first + 2 <= second < MAX_STEPS and (ckpts / tag_for(second) / "vla_scale_state.json").is_file()

    # 3) resumed to the end: every step's losses and the final fp32 weights equal the uninterrupted run's.
    run_ranks(tmp_path, toy_data, *common)
    records, straight = read_metrics(run_dir), read_metrics(reference_run.run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(records, straight, strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == b[term], (a["step"], term)
    ours, theirs = load_fp32_state_dict(run_dir), load_fp32_state_dict(reference_run.run_dir)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.integration
def test_launcher_ignores_sigusr1_and_passes_the_preemption_exit_code(tmp_path, toy_data):
    """launchers/train.sh under a SLURM-like `--signal=USR1`: every process of the job gets the signal; the
    DeepSpeed launcher ignores it, the ranks save and exit 75, and train.sh exits 75."""
    run_dir = tmp_path / "runs" / "debug"
    overrides = ("train.max_steps=50", "train.ckpt_every=0", "train.preempt_signal=SIGUSR1")
    proc = start_launcher(tmp_path, toy_data, *overrides)
    deadline = time.monotonic() + 300
    try:
        while _step(run_dir) < 2:
            assert proc.poll() is None, (tmp_path / "launcher.log").read_text() + rank_logs(tmp_path)
            assert time.monotonic() < deadline, "no step 2 in 300 s"
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGUSR1)
        code = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    assert code == EXIT_PREEMPTED, (tmp_path / "launcher.log").read_text() + rank_logs(tmp_path)
    step = int(read_latest(run_dir / "checkpoints").removeprefix("step_"))
    assert 2 <= step < 50 and _step(run_dir) == step


FAKE_SCONTROL = """#!/usr/bin/env bash
case "$*" in
    "show hostnames gpu-[07-08]") printf 'gpu-07\\ngpu-08\\n' ;;
    "requeue 4242") echo "requeued" >>"$FAKE_LOG" ;;
    *) echo "fake scontrol: unexpected arguments: $*" >&2; exit 1 ;;
esac
"""
# A launcher that records its arguments and exits with FAKE_RC, standing in for launchers/train.sh on each node.
# First it sends SIGUSR1 to itself and to srun's task (the wrapper shell that started it), as SLURM's
# `--signal=USR1@...` does to every process of the step: both must survive it.
FAKE_TRAIN = """#!/usr/bin/env bash
kill -USR1 "$PPID" "$$"
echo "node $NODE_RANK: $*" >>"$FAKE_LOG"
exit "$FAKE_RC"
"""


@pytest.mark.parametrize("rc", [EXIT_PREEMPTED, 3])
def test_slurm_script_requeues_a_preempted_job_only(tmp_path, rc):
    """launchers/slurm.sbatch with fake srun/scontrol: every node's launcher gets train.preempt_signal=SIGUSR1
    (the script asks SLURM for SIGUSR1 before the time limit), and neither it nor srun's wrapper shell dies
    of that signal; exit 75 on the nodes means requeue, any other
    failure is the job's exit code."""
    from tests.train.test_multinode import FAKE_SRUN

    script = (ROOT / "launchers/slurm.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in script and "#SBATCH --requeue" in script
    bin_dir, fake_root = tmp_path / "bin", tmp_path / "root"
    (fake_root / "launchers").mkdir(parents=True)
    bin_dir.mkdir()
    for path, text in ((bin_dir / "scontrol", FAKE_SCONTROL), (bin_dir / "srun", FAKE_SRUN)):
        path.write_text(text)
        path.chmod(0o755)
    (fake_root / "launchers/train.sh").write_text(FAKE_TRAIN)
    (fake_root / "launchers/train.sh").chmod(0o755)
    log = tmp_path / "fake.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NUM_NODES"))}
    env.update(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        VLA_SCALE_ROOT=str(fake_root),
        FAKE_LOG=str(log),
        FAKE_RC=str(rc),
        TMPDIR=str(tmp_path),
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-[07-08]",
        SLURM_NNODES="2",
    )
    cmd = ["bash", str(ROOT / "launchers/slurm.sbatch"), "cfg.yaml", "train.max_steps=9"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    lines = log.read_text().splitlines()
    assert lines[0] == "node 0: cfg.yaml train.preempt_signal=SIGUSR1 train.max_steps=9", lines
    if rc == EXIT_PREEMPTED:
        assert proc.returncode == 0 and lines == [lines[0], lines[0].replace("node 0", "node 1"), "requeued"]
        assert "requeueing job 4242" in proc.stdout
    else:
        assert proc.returncode == rc and "requeued" not in lines, proc.stdout + proc.stderr
