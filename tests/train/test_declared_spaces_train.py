"""A LeRobot set with a continuous gripper (SO-100 style), declared with --no-binary-gripper, trains on 2 ranks
with every action dimension regressed (no loss_gripper), and its exported policy gives the gripper back as a
continuous value in the robot's units."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main as data_tools_main
from tests.data_tools.sources.lerobot import TASKS, make_v3
from tests.train.jobs import FINETUNE, finetune_smoke, run_ranks
from vla_scale.cli import main as cli_main
from vla_scale.data.format import Manifest
from vla_scale.policy import Policy
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_continuous_gripper_trains_without_gripper_loss_and_exports(tmp_path: Path) -> None:
    converted = tmp_path / "data" / "so100"
    src = make_v3(tmp_path / "lerobot", codec="mpeg4", continuous_gripper=True)
    assert data_tools_main(["convert", "lerobot", str(src), str(converted), "--no-binary-gripper"]) == 0
    assert Manifest.load(converted).robot_spaces.action.binary == ()

    overrides = [*finetune_smoke(tmp_path, converted), "model.use_state=true"]
    result = run_ranks(tmp_path, None, *overrides, config=FINETUNE, timeout=600)
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_arm"]) for r in records), records
    assert not any("loss_gripper" in r or "acc_gripper" in r for r in records), records

    export = tmp_path / "export"
    assert cli_main(["export", str(result.run_dir), str(export)]) == 0
    policy = Policy.from_pretrained(export, device="cpu")
    assert (policy.model.binary_dims, policy.model.action_head.gripper) == (0, None)
    assert policy.normalizer.spaces == Manifest.load(converted).robot_spaces
    frame = np.zeros((64, 64, 3), np.uint8)
    actions = policy.predict({"rgb_static": frame, "rgb_wrist": frame}, TASKS[0], np.zeros(4, np.float32))
    assert actions.shape == (2, 3) and np.isfinite(actions).all()
    assert not np.isin(actions[:, -1], (0.0, 1.0)).all()  # regressed, not a thresholded 0/1
