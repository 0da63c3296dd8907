"""Closed-loop evaluation during a 2-rank training run (eval: section), then a resume of the same run.

The dataset is collected from the `instruct` suite's scripted expert (4-D actions, 4-D state), so the
trained policy fits the suite it is evaluated in. Success rates of a 6-step tiny model are noise; the
test checks where and how often they are logged, not what they are.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.train.jobs import ROOT, run_ranks
from vla_scale.train.eval_hook import eval_dir
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration

TASKS = ("touch_red", "touch_blue")
EVAL = (
    "run.name=evrun",
    "wandb.mode=disabled",
    "train.ckpt_every=2",
    "eval.suite=instruct",
    f"eval.tasks=[{','.join(TASKS)}]",
    "eval.every_steps=2",
    "eval.episodes=1",
    "eval.workers=0",  # episodes in the evaluation job itself: the worker pool is tested in tests/eval
    "eval.final_wait_s=240",
)


@pytest.fixture(scope="module")
def instruct_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """robot/ (expert demonstrations of two instruct tasks) + vl/ (grounding questions), 32-px frames."""
    out = tmp_path_factory.mktemp("instruct")
    cmd = [sys.executable, "-m", "data_tools", "collect", "instruct", str(out), "--tasks", ",".join(TASKS)]
    cmd += ["--episodes", "3", "--image-size", "32", "--grounding", "4"]
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=300, capture_output=True)
    return out


def eval_records(records: list[dict]) -> list[dict]:
    return [r for r in records if "eval/step" in r]


def eval_jobs_alive(run_dir: Path) -> list[str]:
    """Command lines of evaluation jobs of this run that are still running."""
    alive = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "vla_scale.train.eval_hook" in cmd and str(run_dir) in cmd:
            alive.append(cmd)
    return alive


def test_eval_during_training_then_resume(tmp_path, instruct_data):
    # 4 steps: step 2 is evaluated in the background while training goes on; step 4 (the end) after it.
    run_dir = run_ranks(tmp_path, instruct_data, *EVAL, "train.max_steps=4", timeout=300).run_dir
    records = read_metrics(run_dir)
    evals = eval_records(records)
    assert [r["eval/step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["step"] >= r["eval/step"]  # logged when it finished, never before the step it evaluated
        for task in TASKS:
            assert 0.0 <= r[f"eval/success/{task}"] <= 1.0
        assert r["eval/success"] == pytest.approx(sum(r[f"eval/success/{t}"] for t in TASKS) / len(TASKS))
    for step in (2, 4):
        folder = eval_dir(run_dir, step)
        results = json.loads((folder / "results.json").read_text())
        assert sorted(results["tasks"]) == sorted(TASKS)
        assert not (folder / "checkpoints").exists() and not (folder / "policy").exists()  # cleaned up
    assert eval_jobs_alive(run_dir) == []
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]

    step2_written = os.stat(eval_dir(run_dir, 2) / "results.json").st_mtime_ns

    # As if the job died after step 4's results.json was written but before it was logged.
    kept = [line for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"eval/step": 4' not in line]
    (run_dir / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))

    # Resume to step 6: step 2 is not redone, step 4's result is logged once, step 6 is evaluated at the end.
    run_ranks(tmp_path, instruct_data, *EVAL, "train.max_steps=6", timeout=300)
    records = read_metrics(run_dir)
    evals = eval_records(records)
    assert [r["eval/step"] for r in evals] == [2, 4, 6]
    assert evals[1]["step"] == 5  # the first log step after the resume
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in records if "loss" in r), "NaN loss"
    assert eval_jobs_alive(run_dir) == []
    assert os.stat(eval_dir(run_dir, 2) / "results.json").st_mtime_ns == step2_written  # not redone
