"""`data_tools stats` reproduces the writer's stats.json exactly and `--check` catches a tampered one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.stats import compare_stats, recompute_stats
from data_tools.synth import synth


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stats_src")
    synth(out, episodes=7, vl_samples=2, image_size=16, episodes_per_shard=3, progress=False)
    return out


@pytest.fixture
def robot(pristine: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pristine / "robot", tmp_path / "robot"))


def test_recompute_equals_writer(robot: Path) -> None:
    written = json.loads((robot / "stats.json").read_text())
    fresh = recompute_stats(robot)
    assert set(fresh) == {"action", "state"}
    for name in fresh:
        for stat, values in fresh[name].items():
            np.testing.assert_allclose(values, written[name][stat], rtol=0, atol=1e-12, err_msg=f"{name}.{stat}")
    assert compare_stats(written, fresh) == []


def test_cli_rewrites_atomically(robot: Path, capsys: pytest.CaptureFixture) -> None:
    before = json.loads((robot / "stats.json").read_text())
    (robot / "stats.json").unlink()
    assert main(["stats", str(robot)]) == 0
    out = capsys.readouterr().out
    assert "q99" in out and "action" in out and "state" in out and "wrote" in out
    assert json.loads((robot / "stats.json").read_text()) == before
    assert not list(robot.glob("*.tmp"))
    assert main(["stats", str(robot), "--check"]) == 0
    assert "OK" in capsys.readouterr().out


def test_check_catches_tampering(robot: Path, capsys: pytest.CaptureFixture) -> None:
    stats = json.loads((robot / "stats.json").read_text())
    stats["state"]["q99"][2] += 1e-3
    (robot / "stats.json").write_text(json.dumps(stats))
    assert main(["stats", str(robot), "--check"]) == 1
    out = capsys.readouterr().out
    assert "state.q99[2]" in out and "data_tools stats" in out
    assert json.loads((robot / "stats.json").read_text()) == stats  # --check never writes

    stats["state"]["q99"][2] -= 1e-3 - 1e-7  # within tolerance again
    (robot / "stats.json").write_text(json.dumps(stats))
    assert main(["stats", str(robot), "--check"]) == 0


def test_check_missing_file_and_vl_dataset(robot: Path, pristine: Path, capsys: pytest.CaptureFixture) -> None:
    (robot / "stats.json").unlink()
    assert main(["stats", str(robot), "--check"]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["stats", str(pristine / "vl")]) == 2
    assert "only for robot datasets" in capsys.readouterr().err
