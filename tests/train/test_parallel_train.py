"""`model.action_space: parallel` (+ FiLM, as configs/debug_parallel.yaml) trains on 2 ranks under ZeRO-2 and its
export decodes the whole chunk as a Policy, equal to the checkpoint's model."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from tests.train.jobs import run_ranks
from tests.train.policy_check import first_episode, reference_actions
from vla_scale.cli import main as cli_main
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.policy import Policy
from vla_scale.train.export import build_run_model
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_parallel_decoder_trains_on_two_ranks_and_exports(tmp_path: Path, toy_data: Path) -> None:
    result = run_ranks(
        tmp_path,
        toy_data,
        "model.action_space=parallel",
        "model.film=true",
        "train.zero_stage=2",
        "train.max_steps=2",
        "train.ckpt_every=2",
        timeout=420,
    )
    records = [r for r in read_metrics(result.run_dir) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_arm"]) for r in records), records
    assert any("loss_gripper" in r for r in records), records

    export = tmp_path / "export"
    assert cli_main(["export", str(result.run_dir), str(export)]) == 0
    policy = Policy.from_pretrained(export, device="cpu")
    assert policy.model.cfg.action_space == "parallel"
    model, cfg = build_run_model(result.run_dir)
    ep = first_episode(toy_data)
    frame, state = ep.frames["rgb_static"][0], ep.state[0]
    normalizer = Normalizer(load_stats(toy_data / "robot"))
    expected = reference_actions(model, normalizer, frame, ep.instruction, state, cfg.data.max_text_len)
    actions = policy.predict({"rgb_static": frame}, ep.instruction, state)
    assert actions.shape == (cfg.data.fwd_pred_next_n, 4) and np.isfinite(actions).all()
    np.testing.assert_allclose(actions, expected, atol=1e-5, rtol=0)
