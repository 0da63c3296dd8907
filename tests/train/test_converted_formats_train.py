"""Each source format converts with `python -m data_tools convert` and then trains on 2 ranks (4 jobs for 5 formats)."""

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.synth import synth
from tests.data_tools.sources.calvin import make_calvin
from tests.data_tools.sources.hdf5 import make_robomimic
from tests.data_tools.sources.lerobot import make_v3
from tests.data_tools.sources.llava import make_llava
from tests.data_tools.sources.rlds import make_rlds
from tests.train.jobs import run_ranks
from vla_scale.data.format import Manifest
from vla_scale.data.loader import batch_sources
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration

# 2 ranks x micro batch 2 with a global batch of 8 is 2 micro batches per rank per step. The batch's kind
# (robot or VL) is drawn per micro batch from (seed, batch index); under seed 2 batches 0-3 go robot, VL,
# VL, robot, so both loss terms appear in 2 steps (seed 0 draws only robot batches there).
SEED = 2


def _lerobot(work: Path) -> list[str]:
    return ["lerobot", str(make_v3(work / "lerobot"))]


def _rlds(work: Path) -> list[str]:
    return ["rlds", str(make_rlds(work)), "--no-binary-gripper"]  # continuous actions: no binary gripper


def _hdf5(work: Path) -> list[str]:
    work.mkdir(parents=True, exist_ok=True)
    return ["hdf5", str(make_robomimic(work / "image.hdf5")), "--instruction", "lift the cube", "--no-binary-gripper"]


def _calvin(work: Path) -> list[str]:
    return ["calvin", str(make_calvin(work / "training")), "--trust-pickle"]


def _llava(work: Path) -> list[str]:
    src = make_llava(work)
    return ["llava", str(src), "--image-folder", str(src.parent / "images")]


# format → (builds the source and returns the `convert` arguments before OUT, kind of the converted set)
FORMATS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "lerobot": (_lerobot, "robot"),
    "rlds": (_rlds, "robot"),
    "hdf5": (_hdf5, "robot"),
    "calvin": (_calvin, "robot"),
    "llava": (_llava, "vl"),
}


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    synth(out, episodes=8, vl_samples=8, image_size=32, episodes_per_shard=4, progress=False)
    return out


@pytest.fixture(scope="module")
def backbone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny backbone folder for the module: the first job's prepare step writes it, the others reuse it."""
    return tmp_path_factory.mktemp("shared") / "backbone"


# The converted robot sets disagree on (action_dim, state_dim), so each trains in a job of its own, beside a
# synthetic VL set; the converted VL set (llava) joins the lerobot job instead of a job of its own.
JOBS = [("lerobot", "llava"), ("rlds",), ("hdf5",), ("calvin",)]
assert sorted(f for job in JOBS for f in job) == sorted(FORMATS), "every format trains in one job"


def convert(fmt: str, work: Path) -> tuple[Path, Manifest]:
    """Build `fmt`'s source under `work` and convert it with the CLI; returns the converted folder and manifest."""
    make_source, kind = FORMATS[fmt]
    converted = work / "converted"
    args = make_source(work / "src")
    assert main(["convert", *args[:2], str(converted), "--episodes-per-shard", "2", *args[2:]]) == 0
    manifest = Manifest.load(converted)
    assert manifest.kind == kind and manifest.num_samples >= 2  # enough for 2 ranks x 1 worker
    return converted, manifest


@pytest.mark.parametrize("formats", JOBS, ids="+".join)
def test_convert_then_train(formats: tuple[str, ...], tmp_path: Path, synth_data: Path, backbone: Path) -> None:
    draws = [batch_sources(SEED, i, np.array([0.75, 0.25]), ["robot", "vl"], 2) for i in range(4)]
    assert {0, 1} <= {src for batch in draws for src in batch}, f"seed {SEED} no longer mixes both kinds: {draws}"

    # run_ranks reads <data>/robot and <data>/vl: link the converted sets in, and a synthetic one for a kind
    # no converted set supplies.
    data = tmp_path / "data"
    data.mkdir()
    manifests = []
    for fmt in formats:
        converted, manifest = convert(fmt, tmp_path / fmt)
        (data / manifest.kind).symlink_to(converted, target_is_directory=True)
        manifests.append(manifest)
    for kind in ("robot", "vl"):
        if not (data / kind).exists():
            (data / kind).symlink_to(synth_data / kind, target_is_directory=True)
    run_ranks(
        tmp_path,
        data,
        "train.max_steps=2",
        "train.ckpt_every=2",
        f"run.seed={SEED}",
        f"model.backbone.pretrained={backbone}",  # the last override wins over run_ranks' own
    )

    run_dir = tmp_path / "runs" / "debug"
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in records), records
    for term in ("loss_arm", "loss_vl"):
        assert any(term in r and math.isfinite(r[term]) for r in records), f"{term} missing from metrics.jsonl"
    for manifest in manifests:
        assert f"mix/{manifest.name}" in set().union(*records), f"the converted {manifest.name} supplied no samples"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    assert any((run_dir / "checkpoints" / "step_00000002").rglob("*optim_states.pt"))
    assert json.loads((run_dir / "ds_config.json").read_text())["train_batch_size"] == 8
