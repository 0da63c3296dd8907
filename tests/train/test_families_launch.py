"""Two more backbone families on 2 CPU ranks (started directly, as a launcher would), ZeRO-2, a few steps each."""

import numpy as np
import pytest

from tests.train.jobs import run_ranks
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "family, overrides",
    [
        # Qwen2.5-VL: multimodal rotary positions, discrete actions, frames interleaved in one sequence
        ("qwen2_5_vl", ["model.action_space=discrete", "model.discrete.n_bin=32", "model.history_type=pre"]),
        # Kosmos-2 under DeepSpeed bf16 (its position table stays fp32 there), GPT history head
        ("kosmos2", ["train.bf16=true", "model.head.type=gpt", "model.head.num_heads=2", "data.window_size=2"]),
    ],
)
def test_family_trains_on_two_ranks(tmp_path, toy_data, family, overrides):
    run_ranks(
        tmp_path,
        toy_data,
        f"model.backbone.family={family}",
        "train.max_steps=3",
        "train.zero_stage=2",
        *overrides,
    )
    records = read_metrics(tmp_path / "runs" / "debug")
    assert [r["step"] for r in records] == [1, 2, 3]
    terms = set().union(*records)
    assert ("loss_action_ce" if "discrete" in " ".join(overrides) else "loss_arm") in terms
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
