"""LeRobot v3.0 / v2.1 folders, written with pyarrow and PyAV, arrive intact in vla_scale shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.convert import lerobot
from data_tools.convert.common import PROGRESS_FILE
from tests.data_tools.sources.lerobot import LENGTHS, SIZE, TASKS, action, frame, make_v3, make_v21, state
from vla_scale.data.format import Manifest, decode_episode


def read_episodes(out: Path) -> list:
    manifest = Manifest.load(out)
    urls = [str(out / s.path) for s in manifest.shards]
    return [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def block_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest difference of block-interior means (video is lossy at block edges)."""
    worst = 0.0
    for r in (0, 32):
        for c in (0, 32):
            ia = a[r + 6 : r + 26, c + 6 : c + 26].astype(float).mean((0, 1))
            ib = b[r + 6 : r + 26, c + 6 : c + 26].astype(float).mean((0, 1))
            worst = max(worst, float(np.abs(ia - ib).max()))
    return worst


def check_output(out: Path, video_cams: tuple[str, ...], episodes: tuple[int, ...] = (0, 1, 2)) -> None:
    manifest = Manifest.load(out)
    assert manifest.num_samples == len(episodes)
    assert sum(s.frames for s in manifest.shards) == sum(LENGTHS[e] for e in episodes)
    assert manifest.cameras == ["rgb_static", "rgb_wrist"]
    assert (manifest.action_dim, manifest.state_dim, manifest.image_size) == (3, 4, [SIZE, SIZE])
    assert set(json.loads((out / "stats.json").read_text())) == {"action", "state"}
    assert not (out / PROGRESS_FILE).exists()
    got = read_episodes(out)
    assert [ep.key for ep in got] == [f"ep{e:06d}" for e in episodes]
    for e, ep in zip(episodes, got, strict=True):
        assert ep.instruction == TASKS[e % 2]
        assert ep.meta["episode_index"] == e
        np.testing.assert_array_equal(ep.state, np.array([state(e, t) for t in range(LENGTHS[e])], np.float32))
        np.testing.assert_array_equal(ep.action, np.array([action(e, t) for t in range(LENGTHS[e])], np.float32))
        for cam_i, cam in enumerate(("rgb_static", "rgb_wrist")):
            assert len(ep.frames[cam]) == LENGTHS[e]
            for t, img in enumerate(ep.frames[cam]):
                if cam in video_cams:
                    assert block_error(img, frame(e, t, cam_i)) < 12, (e, cam, t)
                else:
                    np.testing.assert_array_equal(img, frame(e, t, cam_i))  # PNG → PNG: exact


def convert(src: Path, out: Path, *extra: str) -> int:
    return main(["convert", "lerobot", str(src), str(out), "--image-ext", "png", "--episodes-per-shard", "2", *extra])


@pytest.fixture(scope="module")
def v3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_v3(tmp_path_factory.mktemp("lerobot") / "v3")


def test_v3_av1_video_and_png_images(v3: Path, tmp_path: Path) -> None:
    assert convert(v3, tmp_path / "out") == 0
    check_output(tmp_path / "out", video_cams=("rgb_static",))
    assert len(Manifest.load(tmp_path / "out").shards) == 2


def test_v21_one_file_per_episode(tmp_path: Path) -> None:
    src = make_v21(tmp_path / "v21")
    assert convert(src, tmp_path / "out", "--shard-size-mb", "1") == 0
    check_output(tmp_path / "out", video_cams=("rgb_static", "rgb_wrist"))


def test_workers_give_identical_shards(v3: Path, tmp_path: Path) -> None:
    assert convert(v3, tmp_path / "w1", "--episodes-per-shard", "1") == 0
    assert convert(v3, tmp_path / "w2", "--episodes-per-shard", "1", "--workers", "2") == 0
    names = [s.path for s in Manifest.load(tmp_path / "w1").shards]
    assert len(names) == 3
    assert [(tmp_path / "w1" / n).read_bytes() for n in names] == [(tmp_path / "w2" / n).read_bytes() for n in names]


def test_resume_after_failure_matches_full_run(v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert convert(v3, tmp_path / "full", "--episodes-per-shard", "1") == 0
    real = lerobot.load_episode
    calls: list[int] = []

    def failing(src: lerobot.Source):
        calls.append(src.episode_index)
        if src.episode_index == 2:
            raise RuntimeError("simulated crash")
        return real(src)

    monkeypatch.setattr(lerobot, "load_episode", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(v3, tmp_path / "out", "--episodes-per-shard", "1")
    out = tmp_path / "out"
    assert not (out / "manifest.json").exists()
    assert json.loads((out / PROGRESS_FILE).read_text())["episodes_done"] == 2
    calls.clear()
    monkeypatch.setattr(lerobot, "load_episode", lambda src: calls.append(src.episode_index) or real(src))
    assert convert(v3, out, "--episodes-per-shard", "1", "--resume") == 0
    assert calls == [2]  # the two finished shards were kept, not redone
    for name in ("shard-000000.tar", "shard-000001.tar", "shard-000002.tar", "stats.json"):
        assert (out / name).read_bytes() == (tmp_path / "full" / name).read_bytes()
    assert Manifest.load(out) == Manifest.load(tmp_path / "full")
    assert not (out / PROGRESS_FILE).exists()
    assert convert(v3, out, "--episodes-per-shard", "1", "--resume") == 0  # already complete: no-op
    assert calls == [2]


def test_resume_with_other_settings_is_refused(v3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / PROGRESS_FILE).write_text(json.dumps({"version": 1, "fingerprint": {}, "episodes_done": 0, "shards": []}))
    assert convert(v3, out, "--resume") == 2
    assert "--overwrite" in capsys.readouterr().err


def test_limit_and_camera_option(v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert(v3, out, "--limit", "1", "--camera", "rgb_static=observation.images.wrist") == 0
    (ep,) = read_episodes(out)
    assert list(ep.frames) == ["rgb_static"]
    np.testing.assert_array_equal(ep.frames["rgb_static"][3], frame(0, 3, 1))


def test_bad_keys_give_clear_errors(v3: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert convert(v3, tmp_path / "a", "--state-key", "observation.joints") == 2
    assert "--state-key 'observation.joints'" in capsys.readouterr().err
    assert convert(v3, tmp_path / "b", "--camera", "rgb_static=nope") == 2
    assert "observation.images.top" in capsys.readouterr().err
    assert convert(tmp_path, tmp_path / "c") == 2
    assert "meta/info.json" in capsys.readouterr().err
