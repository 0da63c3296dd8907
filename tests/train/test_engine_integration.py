"""The engine on 2 real CPU ranks: staged unfreezing, NaN steps, LoRA, offload (ranks started directly) and
SIGKILL mid-run / mid-save (through launchers/train.sh)."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.train.jobs import launch, rank_logs, run_ranks, start_launcher, tiny_backbone
from tests.train.nodes import MAX_STEPS
from tests.train.policy_check import first_episode, reference_actions
from vla_scale.cli import main as cli_main
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.model.backbones import load_backbone
from vla_scale.policy import Policy
from vla_scale.train.checkpoint import tag_for
from vla_scale.train.export import build_run_model, load_fp32_state_dict
from vla_scale.train.metrics import read_metrics
from vla_scale.train.stages import group_parameters, resolve_stages

pytestmark = pytest.mark.integration

STAGES = (
    "train.stages=[{start_step: 0, trainable: [heads]},"
    " {start_step: 2, trainable: [heads, decoder_last_1], lr_scale: 0.5},"
    " {start_step: 4, trainable: [all]}]"
)
LOSSES = ("loss", "loss_arm", "loss_gripper", "loss_vl")


def _weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_fp32_state_dict(run_dir, tag_for(step))


def _changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    return {k for k in a if not torch.equal(a[k], b[k])}


def _stage_reports(logs: str) -> dict[int, dict]:
    """rank 0's memory report per stage, from the rank logs."""
    found = re.findall(r"\[vla_scale\] rank 0 stage (\d+) after step \d+: (\{.*\})", logs)
    return {int(i): json.loads(body) for i, body in found}


def _check_stages(run_dir: Path, windows: list[tuple[int, int, int]]) -> None:
    """For (stage, from_step, to_step): between the two checkpoints exactly the stage's parameters may change."""
    model, cfg = build_run_model(run_dir)
    stages = resolve_stages(model, cfg)
    loaded = load_backbone("llava", cfg.model.backbone.pretrained)
    tiny = {f"adapter.{k}": v for k, v in loaded.state_dict().items()}
    first = _weights(run_dir, windows[0][1])
    # stage 0 trains only the heads: the backbone is still the checkpoint it was loaded from
    assert not _changed({k: tiny[k] for k in first if k in tiny}, first)
    for index, start, end in windows:
        before, after = _weights(run_dir, start), _weights(run_dir, end)
        changed = _changed(before, after)
        frozen = set(before) - stages[index].trainable
        assert not changed & frozen, f"stage {index}: frozen parameters changed: {sorted(changed & frozen)[:5]}"
        assert group_parameters(model, "action_head") <= changed, f"stage {index}: the action head did not train"
        if index == 1:
            assert group_parameters(model, "decoder_last_1") <= changed
        if index == 2:
            assert group_parameters(model, "projector") <= changed
            assert "adapter.model.model.vision_tower.embeddings.patch_embedding.weight" in changed


def test_staged_unfreezing_zero2_switches_mid_run_and_resumes_mid_stage(tmp_path, toy_data):
    run_ranks(tmp_path, toy_data, STAGES, "train.max_steps=6", "train.ckpt_every=1", "train.keep_last=0")
    run_dir = tmp_path / "runs" / "debug"
    _check_stages(run_dir, [(0, 1, 2), (1, 2, 4), (2, 4, 6)])
    reports = _stage_reports(rank_logs(tmp_path, tail=None))
    assert sorted(reports) == [0, 1, 2]
    # Adam state (ZeRO-2: this rank's half) exists only for what each stage trains
    for i in range(3):
        assert reports[i]["optim_state_mb"] == pytest.approx(reports[i]["trainable_params"] / 2 * 8 / 2**20, rel=0.01)
    assert reports[0]["trainable_params"] < reports[1]["trainable_params"] < reports[2]["trainable_params"]
    records = read_metrics(run_dir)
    assert [r["stage"] for r in records] == [0, 0, 1, 1, 2, 2]
    assert records[2]["lr"] == pytest.approx(0.5 * records[0]["lr"])

    # Stop inside stage 1 (step 3), resume: the stage's trainable set and optimizer state come back,
    # the switch to stage 2 happens at step 4 again, and every loss matches the uninterrupted run.
    resume = ("run.name=resumed", STAGES, "train.ckpt_every=3")
    run_ranks(tmp_path, toy_data, *resume, "train.max_steps=3")
    job = run_ranks(tmp_path, toy_data, *resume, "train.max_steps=6")
    assert "resumed from" in job.logs
    resumed = read_metrics(tmp_path / "runs" / "resumed")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(resumed, records, strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-7), (a["step"], term)


def test_staged_unfreezing_zero3(tmp_path, toy_data):
    run_ranks(
        tmp_path, toy_data, STAGES, "train.zero_stage=3", "train.max_steps=6", "train.ckpt_every=2", "train.keep_last=0"
    )
    _check_stages(tmp_path / "runs" / "debug", [(1, 2, 4), (2, 4, 6)])
    reports = _stage_reports(rank_logs(tmp_path, tail=None))
    assert reports[0]["optim_state_mb"] < reports[1]["optim_state_mb"] < reports[2]["optim_state_mb"]


def test_nan_step_is_skipped_on_every_rank_zero0(tmp_path, toy_data):
    """ZeRO-0 in fp32 has no overflow check of DeepSpeed's own: GuardedAdamW refuses the step."""
    overrides = ("train.zero_stage=0", "train.max_steps=4", "train.ckpt_every=1", "train.keep_last=0")
    run_ranks(tmp_path, toy_data, *overrides, "debug.inject_nan=loss@2:rank1")
    run_dir = tmp_path / "runs" / "debug"
    assert not _changed(_weights(run_dir, 1), _weights(run_dir, 2)), "the NaN step changed the weights"
    assert _changed(_weights(run_dir, 2), _weights(run_dir, 3)), "training did not go on after the skip"
    records = read_metrics(run_dir)
    assert "loss" not in records[1] and records[-1]["skipped_steps"] == 1
    assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)


def test_too_many_nan_steps_stop_the_run_naming_step_and_term(tmp_path, toy_data):
    job = run_ranks(
        tmp_path,
        toy_data,
        "train.max_steps=6",
        "train.max_bad_steps=3",
        "debug.inject_nan=loss@2,3,4",
        expect_fail=True,
    )
    logs = job.logs
    assert "steps 2-4: 3 optimizer steps in a row skipped" in logs and "at step 4 in loss" in logs


def _kill_when(proc: subprocess.Popen, ready, tmp_path: Path, timeout: float = 300) -> None:
    """SIGKILL the whole launcher process group as soon as `ready()` holds."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"run ended before the kill point\n{rank_logs(tmp_path)}")
            if time.monotonic() > deadline:
                pytest.fail(f"kill point not reached in {timeout}s\n{rank_logs(tmp_path)}")
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)


def test_sigkill_mid_run_and_during_a_save_resumes_with_identical_losses(tmp_path, toy_data, reference_run):
    """The uninterrupted run to compare with is the session's reference run (tests/train/conftest.py)."""
    common = (f"train.max_steps={MAX_STEPS}", "train.ckpt_every=4")
    straight = read_metrics(reference_run.run_dir)
    assert [r["step"] for r in straight] == list(range(1, MAX_STEPS + 1))

    run_dir = tmp_path / "runs" / "debug"
    ckpts = run_dir / "checkpoints"

    def latest_step() -> int:
        return int((ckpts / "latest").read_text().removeprefix("step_")) if (ckpts / "latest").is_file() else 0

    def past_a_checkpoint() -> bool:
        logged = read_metrics(run_dir) if (run_dir / "metrics.jsonl").is_file() else []
        return latest_step() > 0 and any(r["step"] > latest_step() for r in logged)

    # 1) killed between checkpoints: steps after `latest` were trained and logged, then lost
    _kill_when(start_launcher(tmp_path, toy_data, *common), past_a_checkpoint, tmp_path)
    before = latest_step()
    assert 0 < before < MAX_STEPS

    # 2) resumed, then killed inside the next save: its files are written, `latest` has not moved
    proc = start_launcher(tmp_path, toy_data, *common, "debug.save_pause_s=300")
    pending = ckpts / tag_for(before + 4)
    _kill_when(proc, lambda: "pausing" in rank_logs(tmp_path) and pending.is_dir(), tmp_path)
    assert latest_step() == before, "a save cut short must not move `latest`"

    # 3) resumed to the end: every step's losses equal the uninterrupted run's
    launch(tmp_path, toy_data, *common)
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(records, straight, strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-7), (a["step"], term)


def test_lora_zero1_bf16_run_exports_merged_and_kept(tmp_path, toy_data):
    run_ranks(
        tmp_path,
        toy_data,
        "model.lora.enabled=true",
        "model.lora.r=4",
        "train.zero_stage=1",
        "train.bf16=true",
        "train.max_steps=2",
    )
    run_dir = tmp_path / "runs" / "debug"
    state = _weights(run_dir, 2)
    tiny = load_backbone("llava", str(tiny_backbone(tmp_path, toy_data))).state_dict()
    base = {k.replace(".base_layer", ""): v for k, v in state.items() if k.startswith("adapter.") and ".lora_" not in k}
    for key, value in base.items():  # LoRA default: the backbone itself stays frozen (up to the bf16 round trip)
        torch.testing.assert_close(value, tiny[key.removeprefix("adapter.")].float().to(torch.bfloat16).float())
    assert any(".lora_B." in k and state[k].abs().sum() > 0 for k in state), "LoRA B matrices did not train"

    merged, kept = tmp_path / "merged", tmp_path / "kept"
    assert cli_main(["export", str(run_dir), str(merged)]) == 0
    assert cli_main(["export", str(run_dir), str(kept), "--keep-lora"]) == 0
    assert not any(".lora_" in k for k in load_file(merged / "model.safetensors"))
    assert any(".lora_" in k for k in load_file(kept / "model.safetensors"))
    assert not any("lora" in k or "base_layer" in k for k in load_file(kept / "backbone" / "model.safetensors"))

    ep = first_episode(toy_data)
    model, cfg = build_run_model(run_dir)
    normalizer = Normalizer(load_stats(toy_data / "robot"))
    frame, state0 = ep.frames["rgb_static"][0], ep.state[0]
    expected = reference_actions(model, normalizer, frame, ep.instruction, state0, cfg.data.max_text_len)
    for folder in (merged, kept):
        out = Policy.from_pretrained(folder, device="cpu").predict(frame, ep.instruction, state0)
        np.testing.assert_allclose(out, expected, atol=1e-4, rtol=0)


def test_zero3_with_optimizer_and_parameter_offload(tmp_path, toy_data):
    """Runs DeepSpeed's cpu_adam op as `make install` built it (`build_ops`; compiled here on first use otherwise)."""
    run_ranks(
        tmp_path,
        toy_data,
        "train.zero_stage=3",
        "train.offload_optimizer=true",
        "train.offload_params=true",
        "train.max_steps=3",
        timeout=900,
    )
    run_dir = tmp_path / "runs" / "debug"
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in records)
    assert _changed(_weights(run_dir, 3), {k: v for k, v in load_fp32_state_dict(run_dir).items()}) == set()
