"""A policy export for the server tests, written without training: the debug model with its initial weights.

Serving does not care whether the weights were trained, only that the folder is a real export that
`Policy.from_pretrained` loads: the files `vla-scale export` writes (weights, backbone folder, vla_config.yaml
from `policy_spec`, stats.json of the toy robot set). The chunk is 8 long so asynchronous execution has room to
overlap; state and action are 4-D like the instruct suite's, so the export drives `vla-scale eval` too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.built_once import built_once
from vla_scale.config import load_config
from vla_scale.data.format import Manifest
from vla_scale.model import build_model
from vla_scale.policy import Policy
from vla_scale.train.export import policy_spec

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 8


def write_untrained_export(out: Path, robot_data: Path, chunk: int = CHUNK, overrides: tuple[str, ...] = ()) -> Path:
    """The debug config's model (seeded initial weights) as an export folder `out`."""
    backbone_src = out.parent / f"{out.name}-tiny-backbone"
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        [f"model.backbone.pretrained={backbone_src}", f"data.fwd_pred_next_n={chunk}", *overrides],
    )
    manifest = Manifest.load(robot_data)
    torch.manual_seed(0)
    model = build_model(cfg.model, **manifest.robot_spaces.model_dims(), chunk_size=chunk, load_clip=False).eval()
    out.mkdir(parents=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}  # tied weights: own copies
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    model.adapter.save_pretrained(out / "backbone")
    spec = policy_spec(cfg, manifest, tag="untrained")
    (out / "vla_config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copyfile(robot_data / "stats.json", out / "stats.json")
    return out


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> Path:
    """The shared export (read-only): mlp head, window 1."""
    build = lambda out: write_untrained_export(out / "policy", toy_data / "robot")  # noqa: E731
    return built_once(tmp_path_factory, "serve_export", build) / "policy"


@pytest.fixture(scope="session")
def history_export_dir(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> Path:
    """An export whose answers depend on the episode so far: an LSTM history head over a 3-frame window."""
    history = ("data.window_size=3", "model.head.type=lstm")
    build = lambda out: write_untrained_export(out / "policy", toy_data / "robot", overrides=history)  # noqa: E731
    return built_once(tmp_path_factory, "serve_history_export", build) / "policy"


@pytest.fixture(scope="session")
def flow_export_dir(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> Path:
    """A flow-matching export (action expert sampled by Euler steps): the one action space that inpaints."""
    flow = ("model.action_space=flow",)
    build = lambda out: write_untrained_export(out / "policy", toy_data / "robot", overrides=flow)  # noqa: E731
    return built_once(tmp_path_factory, "serve_flow_export", build) / "policy"


@pytest.fixture(scope="session")
def one_thread() -> None:
    """Server and in-process reference on one torch thread each, so their float results agree bit for bit."""
    torch.set_num_threads(1)


def frame(rng: np.random.Generator, size: int = 48) -> np.ndarray:
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_obs(rng: np.random.Generator, instruction: str = "touch the red block") -> dict:
    """A valid infer observation for the test exports (camera rgb_static, state [4])."""
    return {
        "images": {"rgb_static": frame(rng)},
        "state": rng.standard_normal(4).astype(np.float32),
        "instruction": instruction,
    }


def predict_local(policy: Policy, obs: dict) -> np.ndarray:
    """What the in-process policy answers for an infer observation."""
    return policy.predict(obs["images"]["rgb_static"], obs["instruction"], obs["state"])
