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
from tests.train.jobs import ROOT, run_ranks
from vla_scale.cli import main as cli_main
from vla_scale.data.format import Manifest
from vla_scale.policy import Policy
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration

TINY_BACKBONE = (
    "{family: llava, pretrained: %s, tiny: {hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, "
    "vision_hidden_size: 32, vision_layers: 1, vision_heads: 2, image_size: 32, patch_size: 8}}"
)
SMOKE = (
    "data.window_size=2",
    "data.fwd_pred_next_n=2",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
    "data.max_text_len=32",
    "model.use_state=true",
    "train.bf16=false",
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.ckpt_every=2",
    "optim.warmup_steps=0",
    "wandb.mode=disabled",
)


def test_continuous_gripper_trains_without_gripper_loss_and_exports(tmp_path: Path) -> None:
    converted = tmp_path / "data" / "so100"
    src = make_v3(tmp_path / "lerobot", codec="mpeg4", continuous_gripper=True)
    assert data_tools_main(["convert", "lerobot", str(src), str(converted), "--no-binary-gripper"]) == 0
    assert Manifest.load(converted).robot_spaces.action.binary == ()

    model = f"model.backbone={TINY_BACKBONE % (tmp_path / 'backbone')}"
    config = ROOT / "configs/finetune.yaml"
    result = run_ranks(tmp_path, None, f"data.sources.0.path={converted}", model, *SMOKE, config=config, timeout=600)
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
