"""Preemption through the torch elastic launchers: `preempt.preempted_exit_code`'s rule, and a real torchrun started
through vla_scale/train/torchrun_launch.py (as launchers/torchrun.sh does) whose ranks are plain scripts.

The vla_scale launches themselves: accelerate.sh preempted and resumed on two nodes in tests/train/test_multinode.py.
"""

import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from tests.train.jobs import ROOT, free_port
from vla_scale.train.preempt import EXIT_PREEMPTED, preempted_exit_code


def failures(*codes: int) -> dict[int, ProcessFailure]:
    return {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}


def test_preemption_passes_through_even_when_the_agent_terminated_the_other_ranks():
    assert preempted_exit_code(failures(EXIT_PREEMPTED, EXIT_PREEMPTED)) == EXIT_PREEMPTED
    assert preempted_exit_code(failures(EXIT_PREEMPTED)) == EXIT_PREEMPTED
    assert preempted_exit_code(failures(-15, EXIT_PREEMPTED, -9)) == EXIT_PREEMPTED  # SIGTERM, SIGKILL after grace


def test_any_real_failure_is_not_a_preemption():
    assert preempted_exit_code(failures(1)) is None
    assert preempted_exit_code(failures(EXIT_PREEMPTED, 1)) is None  # a crash beside a preemption is still a crash
    assert preempted_exit_code(failures(-9)) is None  # killed (OOM), nothing preempted
    assert preempted_exit_code({}) is None


# Rank 0 exits with the code in argv; rank 1 would run for a minute (the agent terminates it once rank 0 is gone).
RANK_SCRIPT = """
import os, sys, time
if os.environ["RANK"] == "0":
    sys.exit(int(sys.argv[1]))
time.sleep(60)
"""


@pytest.mark.parametrize(("rank0_exit", "launcher_exit"), [(EXIT_PREEMPTED, EXIT_PREEMPTED), (3, 1)])
def test_torchrun_launch_exits_75_only_for_a_preemption(tmp_path: Path, rank0_exit: int, launcher_exit: int):
    """rank 0 exits 75 → 75 (rank 1 terminated by the agent); a crash → torchrun's own 1."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    cmd = [sys.executable, "-m", "vla_scale.train.torchrun_launch", "--nnodes", "1", "--nproc_per_node", "2"]
    cmd += ["--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(script), str(rank0_exit)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == launcher_exit, done.stderr[-3000:]
    if launcher_exit == EXIT_PREEMPTED:
        assert "ranks stopped for preemption" in done.stderr
