"""configs/debug_fast.yaml (FAST action tokens through the discrete path) on 2 ranks under ZeRO-2: the tokenizer fitted
by `data_tools fit-fast`, a few training steps, then an export whose fast_tokenizer.json lets a fresh process's
Policy decode chunks equal to the checkpoint's own predictions."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main as data_tools
from tests.train.jobs import ROOT, run_ranks
from tests.train.policy_check import first_episode, reference_actions
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.train.export import build_run_model, export_policy
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration

PREDICT = """
import sys
import numpy as np
from tests.train.policy_check import first_episode
from vla_scale.policy import Policy
from pathlib import Path
policy = Policy.from_pretrained(sys.argv[1], device="cpu")
ep = first_episode(Path(sys.argv[2]))
np.save(sys.argv[3], policy.predict(ep.frames["rgb_static"][0], ep.instruction, ep.state[0]))
print("FAST", policy.model.cfg.discrete.tokenizer, policy.model.actions.fast.vocab_size)
"""


def fresh_process_predict(export: Path, data: Path, out: Path, timeout: float = 300) -> str:
    """Policy.from_pretrained + predict in a new interpreter (its own process group, killed on the deadline)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(
        [sys.executable, "-c", PREDICT, str(export), str(data), str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        text, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"the fresh-process Policy did not finish in {timeout}s")
    assert proc.returncode == 0, text[-4000:]
    return text


def test_fast_tokens_train_on_two_ranks_export_and_decode_in_a_fresh_process(tmp_path: Path, toy_data: Path) -> None:
    fast = tmp_path / "fitted" / "fast_tokenizer.json"
    fast.parent.mkdir()
    assert data_tools(["fit-fast", str(toy_data / "robot"), "--chunk", "4", "--out", str(fast)]) == 0
    data = (f"data.sources.0.path={toy_data / 'robot'}", f"data.sources.1.path={toy_data / 'vl'}")
    backbone = f"model.backbone.pretrained={tmp_path / 'backbone'}"
    run_ranks(
        tmp_path,
        None,
        *data,
        backbone,
        f"model.discrete.fast_path={fast}",
        "train.max_steps=3",
        "train.ckpt_every=0",
        config=ROOT / "configs/debug_fast.yaml",
    )
    run_dir = tmp_path / "runs" / "debug_fast"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) for r in records), records
    assert any("loss_action_ce" in r for r in records) and not any("loss_arm" in r for r in records), records

    export = export_policy(run_dir, tmp_path / "policy")
    assert (export / "fast_tokenizer.json").read_bytes() == fast.read_bytes()
    fast.rename(fast.with_name("moved.json"))  # the export must not need the run's copy
    out = tmp_path / "chunk.npy"
    text = fresh_process_predict(export, toy_data, out)
    assert "FAST fast" in text, text[-2000:]
    chunk = np.load(out)
    assert chunk.shape == (4, 4) and np.isfinite(chunk).all()
    assert set(np.unique(chunk[:, 3])) <= {0.0, 1.0}  # the synth gripper: 0 open / 1 closed

    fast.with_name("moved.json").rename(fast)  # the checkpoint's model reads the run's config path
    model, cfg = build_run_model(run_dir)
    ep = first_episode(toy_data)
    normalizer = Normalizer(load_stats(toy_data / "robot"))
    frame, state = ep.frames["rgb_static"][0], ep.state[0]
    expected = reference_actions(model, normalizer, frame, ep.instruction, state, cfg.data.max_text_len)
    np.testing.assert_allclose(chunk, expected, rtol=1e-5, atol=1e-6)
