"""LeRobot v3.0 / v2.1 folders, written with pyarrow and PyAV, arrive intact in vla_scale shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
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


def test_v3_videos_split_over_files_and_chunks_elsewhere_than_the_data(tmp_path: Path) -> None:
    """Episode 0 alone in video chunk 0; episodes 1 and 2 share chunk 1's file, though their data sit in two files:
    each episode's frames must come from its own file from its own start time."""
    src = make_v3(tmp_path / "v3", video_files={(0, 0): [0], (1, 0): [1, 2]})
    assert (src / "videos" / "observation.images.top" / "chunk-001" / "file-000.mp4").is_file()
    assert convert(src, tmp_path / "out") == 0
    check_output(tmp_path / "out", video_cams=("rgb_static",))


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


def make_two_task_episode(root: Path, version: str) -> Path:
    """Episode 1 does TASKS[1] for frames 0-2, then TASKS[0]: its metadata lists both, its rows say which."""
    data = root / ("data/chunk-000/file-000.parquet" if version == "v3.0" else "data/chunk-000/episode_000001.parquet")
    table = pq.read_table(data)
    ep, t = table.column("episode_index").to_numpy(), table.column("frame_index").to_numpy()
    task = np.where((ep == 1) & (t >= 3), 0, table.column("task_index").to_numpy())
    table = table.set_column(table.column_names.index("task_index"), "task_index", pa.array(task, pa.int64()))
    pq.write_table(table, data)
    if version == "v3.0":
        meta = root / "meta/episodes/chunk-000/file-000.parquet"
        rows = pq.read_table(meta).to_pylist()
        rows[1]["tasks"] = [TASKS[1], TASKS[0]]
        pq.write_table(pa.Table.from_pylist(rows), meta)
    else:
        meta = root / "meta/episodes.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        rows[1]["tasks"] = [TASKS[1], TASKS[0]]
        meta.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.parametrize("version", ["v3.0", "v2.1"])
def test_episode_with_two_tasks_is_split_where_the_task_changes(tmp_path: Path, version: str) -> None:
    make = make_v3 if version == "v3.0" else make_v21
    src = make_two_task_episode(make(tmp_path / "src"), version)
    out = tmp_path / "out"
    assert convert(src, out) == 0
    got = read_episodes(out)
    assert [ep.key for ep in got] == ["ep000000", "ep000001_00", "ep000001_01", "ep000002"]
    assert [ep.instruction for ep in got] == [TASKS[0], TASKS[1], TASKS[0], TASKS[0]]
    first, second = got[1], got[2]
    assert (first.length, second.length) == (3, 4)
    assert (first.meta["segment"], second.meta["segment"], second.meta["frame_start"]) == (0, 1, 3)
    assert first.meta["episode_index"] == second.meta["episode_index"] == 1
    np.testing.assert_array_equal(second.state, np.array([state(1, t) for t in range(3, 7)], np.float32))
    np.testing.assert_array_equal(second.action, np.array([action(1, t) for t in range(3, 7)], np.float32))
    if version == "v3.0":  # the wrist camera is a PNG image column: exact
        for i, t in enumerate(range(3, 7)):
            np.testing.assert_array_equal(second.frames["rgb_wrist"][i], frame(1, t, 1))
    assert sum(s.frames for s in Manifest.load(out).shards) == sum(LENGTHS)


def test_resume_never_loses_part_of_a_split_episode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Shards of 2: episode 1's two parts straddle the first shard cut, so no resume point may follow it."""
    src = make_two_task_episode(make_v3(tmp_path / "src"), "v3.0")
    assert convert(src, tmp_path / "full") == 0
    real = lerobot.load_episode

    def failing(source: lerobot.Source):
        if source.episode_index == 2:
            raise RuntimeError("simulated crash")
        return real(source)

    monkeypatch.setattr(lerobot, "load_episode", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(src, tmp_path / "out")
    assert not (tmp_path / "out" / PROGRESS_FILE).exists()  # shard 0 ends inside episode 1: nothing to resume
    monkeypatch.setattr(lerobot, "load_episode", real)
    assert convert(src, tmp_path / "out", "--resume") == 0
    assert Manifest.load(tmp_path / "out") == Manifest.load(tmp_path / "full")
    for shard in Manifest.load(tmp_path / "full").shards:
        assert (tmp_path / "out" / shard.path).read_bytes() == (tmp_path / "full" / shard.path).read_bytes()
