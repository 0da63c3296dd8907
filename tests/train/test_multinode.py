"""Multi-node launches on one machine: two "nodes" on loopback (killed, then resumed), torchrun, accelerate
(preempted, then resumed), SLURM.

Each "node" is its own launcher invocation (NODE_RANK 0 and 1, one CPU rank each) sharing
one filesystem, as nodes of a cluster share the run directory. Every launcher runs in its
own session and is killed with all its descendants in a `finally`, so a failure never leaves
ranks behind or hangs the suite.
"""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.train.jobs import CONFIG, ROOT, free_port
from tests.train.nodes import LOSS_TERMS, MAX_STEPS, TIMEOUT_S, Launch, launcher_env, overrides, run_logs, wait_all
from vla_scale.train.checkpoint import read_latest, tag_for
from vla_scale.train.metrics import read_metrics
from vla_scale.train.preempt import EXIT_PREEMPTED

CKPT_EVERY = 4

pytestmark = pytest.mark.integration


def test_torchrun_launcher_single_node_two_ranks(reference_run):
    """The session's reference run (tests/train/conftest.py) is an uninterrupted torchrun.sh job."""
    run_dir, logs = reference_run.run_dir, reference_run.logs
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    assert all(0 < r["loss"] < 100 for r in records), "NaN or absurd loss"
    # torchrun wrote one stdout/stderr per local rank; rank 0 (the logging one) reached the end
    local_ranks = sorted(p.parent.name for p in logs.rglob("stderr.log"))
    assert local_ranks == ["0", "1"], run_logs(logs)
    assert f"done: {MAX_STEPS} steps" in run_logs(logs)


def test_two_nodes_on_loopback_killed_after_a_checkpoint_then_resumed(tmp_path, toy_data, reference_run):
    run_dir = tmp_path / "runs" / "debug"
    ckpts = run_dir / "checkpoints"
    args = overrides(tmp_path, toy_data, f"train.ckpt_every={CKPT_EVERY}", "train.keep_last=2")

    def start_nodes(phase: str) -> list[Launch]:
        # A fresh port per phase: the killed phase's port may still be in TIME_WAIT.
        knobs = dict(NUM_NODES="2", CPU_RANKS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        logs = str(tmp_path / f"rank_logs_{phase}")
        # node 1 first: it must wait for node 0 to prepare the run directory, not race it
        node1 = Launch("train.sh", args, launcher_env(NODE_RANK="1", RANK_LOG_DIR=logs, **knobs), tmp_path, f"{phase}1")
        node0 = Launch("train.sh", args, launcher_env(NODE_RANK="0", RANK_LOG_DIR=logs, **knobs), tmp_path, f"{phase}0")
        return [node0, node1]

    # Phase 1: train until the first checkpoint is complete (`latest` written), then kill both nodes.
    nodes = start_nodes("killed")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (ckpts / "latest").is_file():
            exited = [n for n in nodes if n.proc.poll() is not None]
            if exited or time.monotonic() > deadline:
                report = "\n".join(f"----- {n.output.name}\n{n.text()[-6000:]}" for n in nodes)
                pytest.fail(f"no checkpoint before a node exited or {TIMEOUT_S}s passed\n{report}")
            time.sleep(0.05)
    finally:
        for n in nodes:
            n.kill()
    assert "waiting for node 0 to prepare the run" in nodes[1].text()
    killed_at = int((ckpts / "latest").read_text().strip().removeprefix("step_"))
    assert 0 < killed_at < MAX_STEPS, "the job finished before it could be killed; raise MAX_STEPS"

    # Phase 2: start both nodes again on the same run directory; they resume from `latest`.
    nodes = start_nodes("resumed")
    try:
        wait_all(nodes, tmp_path / "rank_logs_resumed", time.monotonic() + TIMEOUT_S)
    finally:
        for n in nodes:
            n.kill()
    logs = run_logs(tmp_path / "rank_logs_resumed")
    assert "resumed from" in logs and f"done: {MAX_STEPS} steps" in logs, logs

    # Both nodes' ranks took part: one rank log each, and each saved its own ZeRO-2 optimizer partition.
    for phase in ("killed", "resumed"):
        names = sorted(p.name.split("_")[-1] for p in (tmp_path / f"rank_logs_{phase}").glob("*.log"))
        assert names == ["rank0.log", "rank1.log"], names
    assert (ckpts / "latest").read_text().strip() == f"step_{MAX_STEPS:08d}"
    partitions = sorted(p.name for p in (ckpts / f"step_{MAX_STEPS:08d}").rglob("*optim_states.pt"))
    assert [p.split("_mp_")[0] for p in partitions] == ["zero_pp_rank_0", "zero_pp_rank_1"], partitions

    # The run finished with every step logged once, and every step's (all-reduced) losses equal the
    # uninterrupted 2-rank torchrun run's: the same ranks see the same batches whether they share a
    # node or not, and the resume continued exactly where the checkpoint left off.
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    reference = read_metrics(reference_run.run_dir)
    for got, want in zip(records, reference, strict=True):
        for term in LOSS_TERMS:
            assert (term in got) == (term in want), (got["step"], term)
            if term in want:
                assert got[term] == pytest.approx(want[term], rel=1e-6, abs=1e-7), (got["step"], term, killed_at)


ACCELERATE_STEPS = 8  # steps take ~0.15 s: room for the signal sent after step 1 to land well before the end


def test_two_nodes_on_loopback_through_accelerate_preempted_then_resumed(tmp_path, toy_data, reference_run):
    """launchers/accelerate.sh, one invocation per node: `accelerate launch` with the prepared DeepSpeed-plugin
    config starts the ranks. SIGUSR1 to every process of the job after step 1 (as SLURM's `--signal` sends it):
    the ranks save and exit 75 and so does each node's accelerate.sh; started again, both nodes resume from that
    checkpoint, and every step's losses equal the uninterrupted 2-rank torchrun reference run's."""
    run_dir = tmp_path / "runs" / "debug"
    extra = (f"train.max_steps={ACCELERATE_STEPS}", f"train.ckpt_every={ACCELERATE_STEPS}")
    args = overrides(tmp_path, toy_data, *extra, "train.preempt_signal=SIGUSR1")
    logs = {(phase, n): tmp_path / f"rank_logs_{phase}{n}" for phase in ("preempted", "resumed") for n in (0, 1)}

    def start_nodes(phase: str) -> list[Launch]:
        # A fresh port per phase: the first phase's port may still be in TIME_WAIT.
        knobs = dict(NUM_NODES="2", CPU_RANKS="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        return [
            Launch(
                "accelerate.sh",
                args,
                launcher_env(NODE_RANK=str(n), RANK_LOG_DIR=str(logs[phase, n]), **knobs),
                tmp_path,
                f"{phase}{n}",
            )
            for n in (1, 0)  # node 1 first: it must wait for node 0 to prepare the run directory
        ]

    # Phase 1: preempted after step 1; each node's launcher passes the ranks' 75 through.
    nodes = start_nodes("preempted")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while not (run_dir / "metrics.jsonl").is_file() or not read_metrics(run_dir):
            if any(n.proc.poll() is not None for n in nodes) or time.monotonic() > deadline:
                report = "\n".join(f"----- {n.output.name}\n{n.text()[-6000:]}" for n in nodes)
                pytest.fail(f"no step logged before a node exited or {TIMEOUT_S}s passed\n{report}")
            time.sleep(0.05)
        for n in nodes:
            n.signal_all(signal.SIGUSR1)
        codes = [n.proc.wait(timeout=max(1.0, deadline - time.monotonic())) for n in nodes]
    finally:
        for n in nodes:
            n.kill()
    report = "\n".join(f"----- {n.output.name}\n{n.text()[-6000:]}" for n in nodes)
    assert codes == [EXIT_PREEMPTED, EXIT_PREEMPTED], report + run_logs(logs["preempted", 0])
    assert "waiting for node 0 to prepare the run" in nodes[0].text()
    stopped_at = int(read_latest(run_dir / "checkpoints").removeprefix("step_"))
    assert 1 <= stopped_at < ACCELERATE_STEPS, f"stopped at {stopped_at}: the run ended before the signal"
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(1, stopped_at + 1))

    # Phase 2: both nodes again on the same run directory, to the end.
    nodes = start_nodes("resumed")
    try:
        wait_all(nodes, logs["resumed", 0], time.monotonic() + TIMEOUT_S)
    finally:
        for n in nodes:
            n.kill()
    resumed = nodes[1].text() + run_logs(logs["resumed", 0])
    assert "resumed from" in resumed and f"done: {ACCELERATE_STEPS} steps" in resumed, resumed

    # The accelerate config points at the run's own ds_config.json: ZeRO stage, precision etc. from the one YAML.
    acc = yaml.safe_load((run_dir / "accelerate_config.yaml").read_text())
    assert acc["distributed_type"] == "DEEPSPEED", acc
    assert Path(acc["deepspeed_config"]["deepspeed_config_file"]) == (run_dir / "ds_config.json").resolve(), acc
    # One rank per node, each with its own stdout file, and each saved its own ZeRO-2 optimizer partition.
    for key, folder in logs.items():
        assert len(list(folder.rglob("stdout.log"))) == 1, (key, run_logs(folder))
    partitions = sorted(p.name for p in (run_dir / "checkpoints" / tag_for(ACCELERATE_STEPS)).rglob("*optim_states.pt"))
    assert [p.split("_mp_")[0] for p in partitions] == ["zero_pp_rank_0", "zero_pp_rank_1"], partitions

    # Every step logged once, with exactly the reference run's losses before and after the preemption (fp32, the
    # same float arithmetic: exact data and optimizer resume).
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, ACCELERATE_STEPS + 1))
    for got, want in zip(records, read_metrics(reference_run.run_dir)[:ACCELERATE_STEPS], strict=True):
        for term in LOSS_TERMS:
            assert (term in got) == (term in want), (got["step"], term)
            if term in want:
                assert got[term] == want[term], (got["step"], term, stopped_at)


def run_dir_helper(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "vla_scale.cli", "run-dir", str(CONFIG), *args]
    return subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_nodes_above_zero_wait_for_node0_and_refuse_a_different_config(tmp_path, toy_data):
    """`vla-scale run-dir`, which nodes > 0 run instead of prepare: it waits for node 0's port, then
    accepts the run directory only if node 0 prepared the same config for the same world size."""
    from vla_scale.train.prepare import prepare_run

    args = overrides(tmp_path, toy_data)
    run_dir = prepare_run(CONFIG, args, world_size=2)

    closed = free_port()
    proc = run_dir_helper(tmp_path, *args, "--world-size", "2", "--wait-for", f"127.0.0.1:{closed}", "--timeout", "0")
    assert proc.returncode == 2 and "did not open" in proc.stderr, proc.stderr

    with socket.socket() as node0:  # stands in for node 0's rendezvous port
        node0.bind(("127.0.0.1", 0))
        node0.listen()
        wait = ["--wait-for", f"127.0.0.1:{node0.getsockname()[1]}", "--timeout", "30"]
        proc = run_dir_helper(tmp_path, *args, "--world-size", "2", *wait)
        assert proc.returncode == 0 and proc.stdout.strip() == str(run_dir), proc.stderr

        proc = run_dir_helper(tmp_path, *args, "train.max_steps=99", "--world-size", "2", *wait)
        assert proc.returncode == 2 and "train.max_steps" in proc.stderr, proc.stderr

        proc = run_dir_helper(tmp_path, *args, "--world-size", "4", *wait)
        assert proc.returncode == 2 and "world size" in proc.stderr, proc.stderr


FAKE_SCONTROL = """#!/usr/bin/env bash
[[ "$*" == "show hostnames gpu-[07-08]" ]] || { echo "fake scontrol: unexpected arguments: $*" >&2; exit 1; }
printf 'gpu-07\\ngpu-08\\n'
"""
# Runs the command once per node, sequentially, with the variables srun sets in each task.
FAKE_SRUN = """#!/usr/bin/env bash
while [[ "${1:-}" == --* ]]; do echo "srun option $1"; shift; done
for ((i = 0; i < SLURM_NNODES; i++)); do
    SLURM_NODEID=$i SLURM_PROCID=$i SLURM_LOCALID=0 "$@" || exit $?
done
"""


@pytest.mark.parametrize("launcher", ["train", "torchrun", "accelerate"])
def test_slurm_script_gives_each_node_its_rank_and_the_first_host_as_master(tmp_path, launcher):
    script = ROOT / "launchers/slurm.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = launcher_env(
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        LAUNCHER=launcher,
        VLA_SCALE_DRY_RUN="1",
        CPU_RANKS="2",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-[07-08]",
        SLURM_NNODES="2",
        SLURM_CPUS_ON_NODE="16",
        SLURM_SUBMIT_DIR=str(ROOT),
    )
    proc = subprocess.run(
        ["bash", str(script), str(CONFIG), f"run.output_dir={tmp_path / 'runs'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "srun option --ntasks-per-node=1" in out and "srun option --cpus-per-task=16" in out
    lines = {n: [ln for ln in out.splitlines() if ln.startswith(f"[dry-run] node {n}:")] for n in (0, 1)}
    assert len(lines[0]) == 2 and len(lines[1]) == 2, out
    # node 0 prepares the run; node 1 only waits for node 0's port (job id 4242 -> port 24242)
    assert "vla_scale.cli prepare" in lines[0][0] and "--world-size 4" in lines[0][0]
    assert "vla_scale.cli run-dir" in lines[1][0] and "--wait-for gpu-07:24242" in lines[1][0]
    assert not (tmp_path / "runs").exists(), "a dry run must not write the run directory"
    for node in (0, 1):
        launch = lines[node][1]
        if launcher == "accelerate":
            assert "--main_process_ip gpu-07" in launch and "--main_process_port 24242" in launch, launch
            assert f"--machine_rank {node}" in launch and "--num_processes 4 --num_machines 2" in launch, launch
            continue
        assert "--master_addr gpu-07" in launch and "--master_port 24242" in launch, launch
        assert f"--node_rank {node}" in launch, launch
        if launcher == "train":
            assert "--num_nodes 2 --num_gpus 2" in launch and "--no_ssh" in launch, launch
        else:
            assert "--nnodes 2 --nproc_per_node 2" in launch, launch
