"""`data_tools inspect` prints the summary and writes non-empty PNGs for robot and VL datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from PIL import Image

from data_tools.__main__ import main
from data_tools.synth import synth


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("inspect_src")
    synth(out, episodes=5, vl_samples=5, image_size=32, episodes_per_shard=2, vl_per_shard=2, progress=False)
    return out


def assert_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG" and min(img.size) > 100


def test_robot(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(dataset / "robot"), "--episodes", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for line in ("kind:        robot", "shards:      3", "samples:     5", "cameras:     rgb_static"):
        assert line in out
    assert "dims:        action 4, state 4" in out and "image size:  [32, 32]" in out
    assert "ep. length:  min " in out and "instructions (" in out and "  - " in out
    assert_png(tmp_path / "frames.png")
    assert_png(tmp_path / "actions.png")


def test_vl(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(dataset / "vl"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "kind:        vl" in out and "samples:     5" in out
    assert "human: <image>" in out and "gpt: " in out
    assert_png(tmp_path / "vl_samples.png")
    assert not (tmp_path / "frames.png").exists()


def test_not_a_dataset(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", str(tmp_path)]) == 2
    assert "not a vla_scale dataset" in capsys.readouterr().err


def test_default_output_goes_beside_the_shards(dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """Not into the current folder: that may be a source checkout or anywhere the user happened to be."""
    robot = Path(shutil.copytree(dataset / "robot", tmp_path / "robot"))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    assert main(["inspect", str(robot), "--episodes", "2"]) == 0
    assert sorted(p.name for p in (robot / "inspect").iterdir()) == ["actions.png", "frames.png"]
    assert not any(cwd.iterdir())
