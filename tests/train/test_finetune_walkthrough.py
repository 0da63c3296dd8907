"""README "Train on your own data": convert a LeRobot set → train configs/finetune.yaml on it → export → predict.

configs/finetune.yaml is trained as the README runs it (one dataset, its path the only data override, no
VL set), with the model and batch shrunk to a CPU smoke test: the tiny random-weight LLaVA instead of
SmolVLM, fp32, 2 steps; the toy episodes are 5-7 frames, so the window and chunk are shortened too.
"""

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


def test_convert_train_export_predict(tmp_path: Path) -> None:
    # 1. convert, with the converter's defaults
    converted = tmp_path / "data" / "my_robot"
    assert data_tools_main(["convert", "lerobot", str(make_v3(tmp_path / "lerobot")), str(converted)]) == 0
    manifest = Manifest.load(converted)
    assert manifest.image_encoding == {"rgb_static": "png", "rgb_wrist": "png"}  # lossless by default

    # 2. train: the template with one override for the dataset path (+ the CPU smoke-test shrink)
    overrides = finetune_smoke(tmp_path, converted, gradient_checkpointing=True)
    result = run_ranks(tmp_path, None, *overrides, config=FINETUNE, timeout=600)
    assert result.run_dir == tmp_path / "runs" / "finetune"
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["loss_arm"]) for r in records), records
    assert not any("loss_vl" in r for r in records)  # one robot dataset, no VL set
    assert (result.run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"

    # 3. export, and use the policy as a robot would
    export = tmp_path / "exports" / "my_robot"
    assert cli_main(["export", str(result.run_dir), str(export)]) == 0
    policy = Policy.from_pretrained(export, device="cpu")
    policy.reset()
    frame = np.zeros((64, 64, 3), np.uint8)
    actions = policy.predict({"rgb_static": frame, "rgb_wrist": frame}, TASKS[0], np.zeros(4, np.float32))
    assert actions.shape == (2, manifest.action_dim) and np.isfinite(actions).all()
