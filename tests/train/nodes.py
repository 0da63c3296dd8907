"""Launcher invocations other than one `launchers/train.sh` per job: torchrun, and several "nodes" on loopback.

Each invocation runs in its own session with its output in a file (a full pipe would block it), and is
killed with every process below it (torchrun puts each rank in a new session) by `Launch.kill`, which
the callers run in a `finally`: a failure never leaves ranks behind or hangs the suite.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.train.jobs import CONFIG, ROOT, debug_overrides

MAX_STEPS = 24  # long enough that a node kill lands between a checkpoint and the end of the run
LOSS_TERMS = ("loss", "loss_arm", "loss_gripper", "loss_vl")
TIMEOUT_S = 400


def launcher_env(**knobs: str) -> dict[str, str]:
    """The test machine's environment minus any cluster settings, plus the launcher knobs given."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NUM_NODES"))}
    env.pop("HOSTFILE", None)
    env.update(
        PYTHON=sys.executable,
        WANDB_MODE="disabled",
        # one thread per rank: 2 ranks on 2 cores, and every run here does the same float arithmetic
        OMP_NUM_THREADS="1",
        # the documented setting for nodes on loopback: gloo binds the loopback interface
        GLOO_SOCKET_IFNAME="lo",
        PREPARE_WAIT_S="180",
    )
    env.update(knobs)
    return env


class Launch:
    """One launcher invocation in its own session; output goes to a file (a full pipe would block it)."""

    def __init__(self, script: str, overrides: list[str], env: dict[str, str], cwd: Path, name: str):
        self.output = cwd / f"{name}.out"
        with self.output.open("w") as out:
            self.proc = subprocess.Popen(
                [str(ROOT / "launchers" / script), str(CONFIG), *overrides],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def text(self) -> str:
        return self.output.read_text()

    def _tree(self) -> list[psutil.Process]:
        """The launcher and every process below it (torchrun puts each rank in a new session)."""
        try:
            return [psutil.Process(self.proc.pid), *psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def signal_all(self, signum: int) -> None:
        """Send `signum` to the launcher and every process below it, as SLURM's `--signal` reaches a job's processes."""
        for p in self._tree():
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass

    def kill(self) -> None:
        """SIGKILL the launcher and every process below it."""
        procs = self._tree()
        self.signal_all(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=30)
        self.proc.wait(timeout=30)


def run_logs(folder: Path) -> str:
    if not folder.is_dir():
        return "(no rank logs)"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "\n".join(f"===== {p.relative_to(folder)} =====\n{p.read_text()[-6000:]}" for p in files)


def wait_all(launches: list[Launch], logs: Path, deadline: float) -> None:
    """Wait for every launcher to exit 0; on failure or timeout show each one's output and rank logs."""
    for launch in launches:
        try:
            launch.proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            report = "\n".join(f"----- {x.output.name}\n{x.text()[-6000:]}" for x in launches)
            pytest.fail(f"launchers still running after {TIMEOUT_S}s\n{report}\n{run_logs(logs)}")
        if launch.proc.returncode != 0:
            report = "\n".join(f"----- {x.output.name}\n{x.text()[-6000:]}" for x in launches)
            pytest.fail(f"{launch.output.name} exited {launch.proc.returncode}\n{report}\n{run_logs(logs)}")


def overrides(work: Path, data: Path, *extra: str) -> list[str]:
    """configs/debug.yaml on the toy data for MAX_STEPS steps, writing runs and the tiny backbone under `work`."""
    return debug_overrides(
        work, data, f"train.max_steps={MAX_STEPS}", "train.process_group_timeout_s=60", "wandb.mode=disabled", *extra
    )


def run_torchrun(work: Path, data: Path, *extra: str) -> tuple[Path, Path]:
    """launchers/torchrun.sh, 2 CPU ranks on this node, to the end; returns the run directory and the rank logs."""
    logs = work / "rank_logs"
    env = launcher_env(CPU_RANKS="2", RANK_LOG_DIR=str(logs))
    launch = Launch("torchrun.sh", overrides(work, data, *extra), env, work, "torchrun")
    try:
        wait_all([launch], logs, time.monotonic() + TIMEOUT_S)
    finally:
        launch.kill()
    return work / "runs" / "debug", logs
