"""Export a real 2-rank run and load it as a Policy in a fresh process; DeepSpeed's zero_to_fp32 agrees."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from data_tools.synth import SPACES
from tests.train.jobs import run_ranks
from tests.train.nodes import MAX_STEPS
from tests.train.policy_check import first_episode, reference_actions
from vla_scale.cli import main as cli_main
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import EPS, Normalizer
from vla_scale.policy import Policy
from vla_scale.train.export import ExportError, build_run_model, export_policy, load_fp32_state_dict
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_data, reference_run) -> dict:
    """The session's 2-rank ZeRO-2 reference run (tests/train/conftest.py), exported once through the CLI;
    shared by every test here. "tmp" is the folder holding the run's tiny backbone."""
    export_dir = tmp_path_factory.mktemp("export_run") / "policy"
    assert cli_main(["export", str(reference_run.run_dir), str(export_dir)]) == 0
    return {"tmp": reference_run.work, "run_dir": reference_run.run_dir, "export": export_dir, "data": toy_data}


def test_export_folder_is_self_contained(run):
    export = run["export"]
    for name in ("model.safetensors", "vla_config.yaml", "stats.json", "backbone/config.json"):
        assert (export / name).is_file(), name
    for name in ("tokenizer.json", "preprocessor_config.json"):
        assert (export / "backbone" / name).is_file(), name
    spec = yaml.safe_load((export / "vla_config.yaml").read_text())
    assert spec["data"] == {
        "window_size": 1,
        "fwd_pred_next_n": 2,
        "max_text_len": 32,
        "action_dim": 4,
        "state_dim": 4,
        "cameras": ["rgb_static"],
        "static_camera": "rgb_static",
        "wrist_camera": None,
        "spaces": SPACES.to_json(),  # what the synthetic set declares: binary gripper last, mean/std
    }
    assert spec["data"]["spaces"]["action"]["binary"] == [3]
    assert spec["model"]["backbone"]["pretrained"] == "backbone" and spec["source"]["tag"] == f"step_{MAX_STEPS:08d}"
    stats = (run["data"] / "robot" / "stats.json").read_text()
    assert (export / "stats.json").read_text() == stats
    weights = load_file(str(export / "model.safetensors"))
    full = load_fp32_state_dict(run["run_dir"])
    assert set(weights) == set(full)
    for key, value in full.items():
        assert torch.equal(weights[key], value), key


def test_policy_in_fresh_process_matches_checkpoint_model(run, tmp_path):
    ep = first_episode(run["data"])
    frames = [ep.frames["rgb_static"][t] for t in (0, 5)]
    states = [ep.state[t] for t in (0, 5)]
    model, cfg = build_run_model(run["run_dir"])
    normalizer = Normalizer(load_stats(run["data"] / "robot"))
    max_len = cfg.data.max_text_len
    pairs = zip(frames, states, strict=True)
    expected = np.stack([reference_actions(model, normalizer, f, ep.instruction, s, max_len) for f, s in pairs])
    np.save(tmp_path / "frames.npy", np.stack(frames), allow_pickle=False)
    np.save(tmp_path / "states.npy", np.stack(states), allow_pickle=False)
    script = textwrap.dedent(
        """
        import sys
        import numpy as np
        from vla_scale.policy import Policy

        folder, instruction, io = sys.argv[1], sys.argv[2], sys.argv[3]
        frames, states = np.load(f"{io}/frames.npy"), np.load(f"{io}/states.npy")
        policy = Policy.from_pretrained(folder, device="cpu")
        out = np.stack([policy.predict(f, instruction, s) for f, s in zip(frames, states)])
        np.save(f"{io}/out.npy", out, allow_pickle=False)
        """
    )
    # The original tiny backbone is moved away: the export must need nothing outside its folder.
    backbone, hidden = run["tmp"] / "backbone", run["tmp"] / "backbone.hidden"
    backbone.rename(hidden)
    try:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
        cmd = [sys.executable, "-c", script, str(run["export"]), ep.instruction, str(tmp_path)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        hidden.rename(backbone)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = np.load(tmp_path / "out.npy")
    assert out.shape == (2, cfg.data.fwd_pred_next_n, 4)  # two steps of [N, A]
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
    assert set(np.unique(out[..., -1])) <= {0.0, 1.0}

    # A run directory loads too (exported to a temporary folder first): same numbers.
    policy = Policy.from_pretrained(run["run_dir"], device="cpu")
    np.testing.assert_allclose(policy.predict(frames[0], ep.instruction, states[0]), expected[0], atol=1e-5, rtol=0)


def test_unnormalisation_uses_dataset_stats(run):
    policy = Policy.from_pretrained(run["export"], device="cpu")
    raw = json.loads((run["data"] / "robot" / "stats.json").read_text())["action"]
    mean, std = np.array(raw["mean"], np.float32), np.array(raw["std"], np.float32)
    arm = np.array([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5]], np.float32)
    out = policy.normalizer.unnormalize_action(arm, np.array([[0.2], [0.9]], np.float32))
    np.testing.assert_allclose(out[0], [*mean[:3], 0.0], rtol=1e-6)
    np.testing.assert_allclose(out[1, :3], arm[1] * (std[:3] + EPS) + mean[:3], rtol=1e-6)
    assert out[1, 3] == 1.0


def test_reset_clears_episode_history(run):
    ep = first_episode(run["data"])
    policy = Policy.from_pretrained(run["export"], device="cpu")
    frame, state = ep.frames["rgb_static"][0], ep.state[0]
    first = policy.predict({"rgb_static": frame}, ep.instruction, state)
    assert len(policy._history) == 1
    policy.reset()
    assert len(policy._history) == 0
    # The same model behind a 3-frame window: history is capped at it, and cleared by reset().
    spec = {**policy.spec, "data": {**policy.spec["data"], "window_size": 3}}
    policy = Policy(policy.model, policy.normalizer, spec)
    for t in range(4):
        out = policy.predict(ep.frames["rgb_static"][t], ep.instruction, ep.state[t])
        assert out.shape == (2, 4)
    assert len(policy._history) == 3
    policy.reset()
    assert len(policy._history) == 0
    np.testing.assert_allclose(policy.predict(frame, ep.instruction, state), first, atol=1e-6)
    with pytest.raises(ValueError, match="proprioceptive state"):
        policy.predict(frame, ep.instruction)
    with pytest.raises(ValueError, match="uint8"):
        policy.predict(frame.astype(np.float32), ep.instruction, state)


def test_export_refuses_run_without_checkpoint(run, tmp_path, capsys):
    bare = tmp_path / "bare_run"
    bare.mkdir()
    (bare / "config.yaml").write_text((run["run_dir"] / "config.yaml").read_text())
    with pytest.raises(ExportError, match="no complete checkpoint"):
        export_policy(bare, tmp_path / "out")
    assert cli_main(["export", str(bare), str(tmp_path / "out")]) == 1
    assert "no complete checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ExportError, match="step_00000099 does not exist"):
        export_policy(run["run_dir"], tmp_path / "out", tag="step_00000099")
    with pytest.raises(ExportError, match="not empty"):
        export_policy(run["run_dir"], run["export"])


def test_zero_to_fp32_script_round_trip(run, tmp_path):
    """DeepSpeed's own recovery script, run as users would, reconstructs the same weights the export holds."""
    ckpts = run["run_dir"] / "checkpoints"
    env = dict(os.environ, DS_ACCELERATOR="cpu")
    cmd = [sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32"), "--safe_serialization"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    recovered = {}
    for shard in sorted((tmp_path / "fp32").glob("*.safetensors")):
        recovered.update(load_file(str(shard)))
    exported = load_file(str(run["export"] / "model.safetensors"))
    assert set(recovered) == set(exported)
    for key, value in exported.items():
        assert torch.equal(recovered[key], value), key


def test_resampler_and_clip_regulariser_run_exports_and_loads_without_clip(tmp_path, toy_data):
    """A 2-rank ZeRO-2 run with both mechanisms logs `loss_clip`; its export loads as a Policy with the tiny CLIP
    text model moved away (a training-only teacher) and predicts what the checkpoint's model predicts."""
    clip = tmp_path / "clip"
    mechanisms = [
        "model.resampler.enabled=true",
        "model.resampler.num_latents=4",
        "model.resampler.dim_head=16",
        "model.clip_reg.enabled=true",
        f"model.clip_reg.pretrained={clip}",
        "model.clip_reg.embed_dim=16",
        "model.clip_reg.tiny.hidden_size=32",
    ]
    run_ranks(tmp_path, toy_data, "train.max_steps=2", "train.ckpt_every=0", *mechanisms)
    run_dir = tmp_path / "runs" / "debug"
    records = read_metrics(run_dir)
    assert any("loss_clip" in r for r in records) and all(r["loss"] == r["loss"] for r in records)
    export = export_policy(run_dir, tmp_path / "policy")
    weights = load_file(str(export / "model.safetensors"))
    assert "clip_reg.proj.weight" in weights and "resampler.latents" in weights
    assert not any("text_model" in k for k in weights)
    model, cfg = build_run_model(run_dir)
    ep = first_episode(toy_data)
    normalizer = Normalizer(load_stats(toy_data / "robot"))
    frame, max_len = ep.frames["rgb_static"][0], cfg.data.max_text_len
    expected = reference_actions(model, normalizer, frame, ep.instruction, ep.state[0], max_len)
    clip.rename(tmp_path / "clip.hidden")
    policy = Policy.from_pretrained(export, device="cpu")
    assert policy.model.clip_reg is not None and policy.model.clip_reg.teacher is None
    out = policy.predict(frame, ep.instruction, ep.state[0])
    np.testing.assert_allclose(out, expected, atol=1e-5, rtol=0)
