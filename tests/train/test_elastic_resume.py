"""Elastic resume: a `data.elastic` run checkpointed on 2 ranks continues on 1 and then on 4, with the global batch
fixed; `prepare` says what the change does, and refuses what it cannot do."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.jobs import run_ranks
from vla_scale.config import ConfigError, load_config
from vla_scale.train import checkpoint
from vla_scale.train.export import load_fp32_state_dict
from vla_scale.train.metrics import read_metrics
from vla_scale.train.resume_check import world_size_change

ROOT = Path(__file__).resolve().parents[2]
# 8 samples per step in micro-batches of 2: 4 virtual readers, so 1, 2 or 4 ranks (accumulation 4, 2, 1).
ELASTIC = ("data.elastic=true", "train.ckpt_every=0", "train.global_batch_size=8")
LOSSES = ("loss", "loss_arm", "loss_gripper", "loss_vl")
REL = 1e-5  # losses: the same samples every step, only the order of float reductions differs


def _cfg(*extra: str):
    return load_config(ROOT / "configs/debug.yaml", list(extra))


def test_world_size_change_is_described_or_refused(tmp_path):
    meta = {"step": 4, "stage": 0, "world_size": 2, "data_elastic": True}
    assert world_size_change(tmp_path, meta, _cfg(*ELASTIC), 2) is None
    note = world_size_change(tmp_path, meta, _cfg(*ELASTIC), 4)
    assert "written by 2 ranks and this job has 4" in note and "gradient accumulation 2 -> 1" in note
    assert "universal checkpoint" in note  # configs/debug.yaml is ZeRO-2
    assert "universal" not in world_size_change(tmp_path, meta, _cfg(*ELASTIC, "train.zero_stage=0"), 4)
    with pytest.raises(ConfigError, match="data.elastic=true"):
        world_size_change(tmp_path, meta, _cfg("train.zero_stage=0"), 4)
    with pytest.raises(ConfigError, match="data.elastic=true"):
        world_size_change(tmp_path, dict(meta, data_elastic=False), _cfg(*ELASTIC), 4)
    with pytest.raises(ConfigError, match="ZeRO-3 optimizer state is partitioned over 2 ranks"):
        world_size_change(tmp_path, meta, _cfg(*ELASTIC, "train.zero_stage=3"), 4)
    with pytest.raises(ConfigError, match="not tested with model.lora"):
        world_size_change(tmp_path, meta, _cfg(*ELASTIC, "model.lora.enabled=true"), 4)


def gathered_zero2(tag_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """One optimizer quantity ("fp32", "exp_avg", "exp_avg_sq") of a ZeRO-1/2 checkpoint, per parameter: every
    rank's flat partition concatenated in rank order, then cut along the saved parameter shapes."""
    shapes = torch.load(tag_dir / "mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
    files = sorted(tag_dir.glob("zero_pp_rank_*_optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    out = {}
    for i, group in enumerate(shapes):
        if key == "fp32":
            flat = torch.cat([p["single_partition_of_fp32_groups"][i] for p in parts])
        else:
            flat = torch.cat([p["base_optimizer_state"]["state"][i][key] for p in parts])
        offset = 0
        for name, shape in group.items():
            out[name] = flat[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
    return out


@pytest.mark.integration
def test_two_ranks_then_one_then_four_continue_the_run(tmp_path, toy_data, capfd):
    """ZeRO-2 (configs/debug.yaml), through universal checkpoints; one step on each world size. (ZeRO-0 needs no
    conversion: its optimizer state is whole in the model file.)"""
    ref, el = tmp_path / "ref", tmp_path / "elastic"
    ref.mkdir(), el.mkdir()
    straight = run_ranks(ref, toy_data, *ELASTIC, "train.max_steps=3").run_dir
    run_dir = run_ranks(el, toy_data, *ELASTIC, "train.max_steps=1").run_dir
    capfd.readouterr()
    run_ranks(el, toy_data, *ELASTIC, "train.max_steps=2", world_size=1)
    assert "written by 2 ranks and this job has 1" in capfd.readouterr().err  # prepare's note
    # the conversion carried the fp32 masters and both Adam moments over exactly (gathered from the 2 ranks)
    ckpts = run_dir / "checkpoints"
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        original = gathered_zero2(ckpts / "step_00000001", key)
        for name, value in original.items():
            converted = torch.load(ckpts / "universal" / "step_00000001" / "zero" / name / f"{key}.pt")["param"]
            assert torch.equal(converted, value), (key, name)
    run_ranks(el, toy_data, *ELASTIC, "train.max_steps=3", world_size=4)
    assert sorted(p.name for p in (ckpts / "universal").glob("step_*")) == ["step_00000001", "step_00000002"]
    meta = json.loads((ckpts / checkpoint.tag_for(3) / checkpoint.META).read_text())
    assert meta["world_size"] == 4 and meta["data_elastic"]

    records, expected = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in records] == [r["step"] for r in expected] == [1, 2, 3]
    for a, b in zip(records, expected, strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=REL, abs=1e-7), (a["step"], term)
    ours, theirs = load_fp32_state_dict(run_dir), load_fp32_state_dict(straight)
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max().detach()) for k in ours)
    print(f"largest weight difference after 2 -> 1 -> 4 ranks: {worst:.2e}")
    assert worst < 1e-5
