"""Elastic resume: a `data.elastic` run checkpointed on 2 ranks continues on 1 and then on 4, with the global batch
fixed; `prepare` says what the change does, and refuses what it cannot do."""

import json
from pathlib import Path

import pytest
import torch

from tests.train.jobs import run_ranks
from vla_scale.config import ConfigError, load_config
from vla_scale.train import checkpoint, universal
from vla_scale.train.export import load_fp32_state_dict
from vla_scale.train.metrics import read_metrics
from vla_scale.train.resume_check import world_size_change

ROOT = Path(__file__).resolve().parents[2]
# 8 samples per step in micro-batches of 2: 4 virtual readers, so 1, 2 or 4 ranks (accumulation 4, 2, 1).
ELASTIC = ("data.elastic=true", "train.ckpt_every=0", "train.global_batch_size=8")
LOSSES = ("loss", "loss_arm", "loss_gripper", "loss_vl")
REL = 1e-5  # losses: the same samples every step, only the order of float reductions differs
# ZeRO-3 with LoRA and a stage switch after step 1 that freezes what stage 0 trained (all but heads and adapters).
STAGES = "[{start_step: 0, trainable: [all]}, {start_step: 1, trainable: [heads, lora]}]"
LORA_STAGES = ("model.lora.enabled=true", f"train.stages={STAGES}")
ZERO3_LORA_STAGES = ("train.zero_stage=3", *LORA_STAGES)


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
    for extra in (ZERO3_LORA_STAGES, ("train.zero_stage=1",)):
        note = world_size_change(tmp_path, meta, _cfg(*ELASTIC, *extra), 4)
        assert "universal checkpoint" in note and "parameters the stage freezes are copied" in note


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


def gathered_zero3(tag_dir: Path, key: str) -> dict[str, torch.Tensor]:
    """The same for a ZeRO-3 checkpoint: each rank holds a slice of every parameter (padded to a multiple of the
    world size), the slices of one parameter sit one after another in the rank's flat group."""
    shapes = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["param_shapes"]
    files = sorted(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt"), key=lambda f: int(f.name.split("_")[3]))
    parts = [torch.load(f, weights_only=False)["optimizer_state_dict"] for f in files]
    out = {}
    for i, group in enumerate(shapes):
        if key == "fp32":
            flats = [p["fp32_flat_groups"][i] for p in parts]
        else:
            flats = [p["optimizer_state_dict"]["state"][i][key] for p in parts]
        offset = 0
        for name, shape in group.items():
            size = -(-shape.numel() // len(parts))
            out[name] = torch.cat([f[offset : offset + size] for f in flats])[: shape.numel()].view(shape)
            offset += size
    return out


def assert_converted_exactly(ckpts: Path, tag: str, gather) -> None:
    """The universal conversion of `tag` holds the gathered fp32 masters and both Adam moments, bit for bit."""
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        original = gather(ckpts / tag, key)
        assert original
        for name, value in original.items():
            converted = torch.load(ckpts / "universal" / tag / "zero" / name / f"{key}.pt")
            if isinstance(converted, dict):  # ZeRO 1/2; ZeRO-3's conversion saves the flat tensor alone
                converted = converted["param"]
            assert torch.equal(converted.flatten(), value.flatten()), (key, name)


def assert_continues(run_dir: Path, straight: Path, bound: float) -> float:
    """Every logged loss within REL of the uninterrupted run's, the final weights within `bound`; returns the
    largest weight difference."""
    records, expected = read_metrics(run_dir), read_metrics(straight)
    assert [r["step"] for r in records] == [r["step"] for r in expected]
    for a, b in zip(records, expected, strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=REL, abs=1e-7), (a["step"], term)
    ours, theirs = load_fp32_state_dict(run_dir), load_fp32_state_dict(straight)
    assert ours.keys() == theirs.keys()
    worst = max(float((ours[k] - theirs[k]).abs().max().detach()) for k in ours)
    assert worst < bound, worst
    return worst


@pytest.mark.integration
def test_two_ranks_then_one_then_four_continue_the_run(tmp_path, toy_data, capfd):
    """ZeRO-2 (configs/debug.yaml) with LoRA and a stage switch after step 1, through universal checkpoints; one
    step on each world size: 2 ranks in stage 0, 1 rank switching to stage 1, then 4 ranks resuming stage 1 (its
    frozen weights from the checkpoint). ZeRO-0 needs no conversion: its optimizer state is whole in the model
    file."""
    ref, el = tmp_path / "ref", tmp_path / "elastic"
    ref.mkdir(), el.mkdir()
    straight = run_ranks(ref, toy_data, *ELASTIC, *LORA_STAGES, "train.max_steps=3").run_dir
    run_dir = run_ranks(el, toy_data, *ELASTIC, *LORA_STAGES, "train.max_steps=1").run_dir
    ckpts = run_dir / "checkpoints"
    # converted here as rank 0 would (the ranks then load this folder): it carries the fp32 masters and both
    # Adam moments over exactly (gathered from the 2 ranks); the ranks' next checkpoint removes it
    universal.convert(ckpts, "step_00000001", rank=0)
    assert_converted_exactly(ckpts, "step_00000001", gathered_zero2)
    capfd.readouterr()
    run_ranks(el, toy_data, *ELASTIC, *LORA_STAGES, "train.max_steps=2", world_size=1)
    assert "written by 2 ranks and this job has 1" in capfd.readouterr().err  # prepare's note
    assert json.loads((ckpts / checkpoint.tag_for(2) / checkpoint.META).read_text())["stage"] == 1
    run_ranks(el, toy_data, *ELASTIC, *LORA_STAGES, "train.max_steps=3", world_size=4)
    assert not (ckpts / "universal").exists()  # the step-3 checkpoint made both conversions unneeded
    meta = json.loads((ckpts / checkpoint.tag_for(3) / checkpoint.META).read_text())
    assert meta["world_size"] == 4 and meta["data_elastic"]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]
    worst = assert_continues(run_dir, straight, 1e-5)
    print(f"largest weight difference after 2 -> 1 -> 4 ranks: {worst:.2e}")


@pytest.mark.integration
def test_zero3_lora_stage_switch_two_ranks_then_one(tmp_path, toy_data, capfd):
    """ZeRO-3, LoRA, and a checkpoint written in the second stage, which freezes most of what the first trained:
    the stage's optimizer converts exactly, the frozen weights come back from the checkpoint, and the run
    continues like an unchanged one (DeepSpeed's ZeRO-3 loader alone drifted 1.4e-4 after one step)."""
    ref, el = tmp_path / "ref", tmp_path / "elastic"
    ref.mkdir(), el.mkdir()
    straight = run_ranks(ref, toy_data, *ELASTIC, *ZERO3_LORA_STAGES, "train.max_steps=3").run_dir
    run_dir = run_ranks(el, toy_data, *ELASTIC, *ZERO3_LORA_STAGES, "train.max_steps=2").run_dir
    ckpts = run_dir / "checkpoints"
    assert json.loads((ckpts / "step_00000002" / checkpoint.META).read_text())["stage"] == 1
    universal.convert(ckpts, "step_00000002", rank=0)
    assert_converted_exactly(ckpts, "step_00000002", gathered_zero3)
    names = set(gathered_zero3(ckpts / "step_00000002", "fp32"))
    assert any(".lora_" in n for n in names) and not any("base_layer" in n for n in names)  # stage 1's optimizer
    capfd.readouterr()
    run_ranks(el, toy_data, *ELASTIC, *ZERO3_LORA_STAGES, "train.max_steps=3", world_size=1)
    assert "written by 2 ranks and this job has 1" in capfd.readouterr().err
    assert not (ckpts / "universal").exists()
    worst = assert_continues(run_dir, straight, 1e-5)
    print(f"largest weight difference after 2 -> 1 ranks (ZeRO-3, LoRA, stage 1): {worst:.2e}")
