"""One uninterrupted 2-rank run per session, shared by every test that needs a plain debug run to compare with.

configs/debug.yaml trains at a constant learning rate, so the first N steps of this run are exactly what an
N-step run of the same config logs: the resume, SIGKILL and multi-node tests compare their losses with it,
and the export tests export its final checkpoint, instead of each training a reference of their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.built_once import built_once
from tests.train.nodes import run_torchrun


@dataclass(frozen=True)
class ReferenceRun:
    """Where the reference run lives: its work folder (runs/, backbone/), run directory and rank logs."""

    work: Path
    run_dir: Path
    logs: Path


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> ReferenceRun:
    """nodes.MAX_STEPS steps of configs/debug.yaml (ZeRO-2, fp32) on the toy data, 2 CPU ranks started by
    launchers/torchrun.sh, one checkpoint at the end. Read-only for its users (a test that moves a file
    away puts it back). Built once per session, by whichever xdist worker needs it first."""
    # Its own backbone folder: tests/train/test_export_policy.py moves it away for a moment.
    work = built_once(
        tmp_path_factory,
        "reference",
        lambda out: run_torchrun(out, toy_data, "train.ckpt_every=0", f"model.backbone.pretrained={out / 'backbone'}"),
    )
    run_dir, logs = work / "runs" / "debug", work / "rank_logs"
    optim = yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]
    assert optim["schedule"] == "constant" and not optim["warmup_steps"], (
        "the reference run stands in for shorter runs only at a constant learning rate; "
        f"configs/debug.yaml now has {optim}"
    )
    return ReferenceRun(work, run_dir, logs)
