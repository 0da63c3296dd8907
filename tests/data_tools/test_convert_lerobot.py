"""LeRobot v3.0 / v2.1 folders, written with pyarrow and PyAV, arrive intact in vla_scale shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main
from data_tools.convert import lerobot
from data_tools.convert.common import PROGRESS_FILE
from vla_scale.data.format import Manifest, decode_episode

FPS = 10
SIZE = 64
LENGTHS = (5, 7, 6)
TASKS = ("pick up the red block", "push the blue disc")


def frame(ep: int, t: int, cam: int) -> np.ndarray:
    """Four flat-coloured 32x32 blocks, different per episode, step and camera (video-codec friendly)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    base = (ep * 70 + t * 23 + cam * 110) % 200
    for b, (r, c) in enumerate(((0, 0), (0, 32), (32, 0), (32, 32))):
        img[r : r + 32, c : c + 32] = ((base + 50 * b) % 256, (255 - base - 30 * b) % 256, (40 + 60 * b) % 256)
    return img


def state(ep: int, t: int) -> list[float]:
    return [ep * 100 + t + 0.25 * d for d in range(4)]


def action(ep: int, t: int) -> list[float]:
    return [ep - t * 0.5, 0.125 * t, float(t % 2)]


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_mp4(path: Path, frames: list[np.ndarray], codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.codec_context.gop_size = 4  # keyframes inside episodes: the reader must seek and skip
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def frame_table(eps: list[int], start_index: int) -> pa.Table:
    """Data rows of these episodes: state, action, a PNG image column (the wrist camera) and indices."""
    rows = [(ep, t) for ep in eps for t in range(LENGTHS[ep])]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "observation.state": pa.array([state(e, t) for e, t in rows], pa.list_(pa.float32(), 4)),
            "action": pa.array([action(e, t) for e, t in rows], pa.list_(pa.float32(), 3)),
            "observation.images.wrist": pa.array(
                [{"bytes": png(frame(e, t, 1)), "path": f"frame_{t:06d}.png"} for e, t in rows], image_type
            ),
            "timestamp": pa.array([t / FPS for _, t in rows], pa.float32()),
            "frame_index": pa.array([t for _, t in rows], pa.int64()),
            "episode_index": pa.array([e for e, _ in rows], pa.int64()),
            "index": pa.array(range(start_index, start_index + len(rows)), pa.int64()),
            "task_index": pa.array([e % 2 for e, _ in rows], pa.int64()),
        }
    )


def features() -> dict:
    return {
        "observation.images.top": {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "c"]},
        "observation.images.wrist": {"dtype": "image", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "c"]},
        "observation.state": {"dtype": "float32", "shape": [4], "names": None},
        "action": {"dtype": "float32", "shape": [3], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def make_v3(root: Path, codec: str = "libsvtav1") -> Path:
    """Episodes 0, 1 share data/video file 000 (episode 1 starts mid-file); episode 2 is in file 001."""
    files = {0: [0, 1], 1: [2]}
    info = {
        "codebase_version": "v3.0",
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features(),
    }
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    rows, index = [], 0
    for f, eps in files.items():
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        table = frame_table(eps, index)
        pq.write_table(table, root / "data" / "chunk-000" / f"file-{f:03d}.parquet")
        write_mp4(
            root / "videos" / "observation.images.top" / "chunk-000" / f"file-{f:03d}.mp4",
            [frame(e, t, 0) for e in eps for t in range(LENGTHS[e])],
            codec,
        )
        offset = 0
        for e in eps:
            rows.append(
                {
                    "episode_index": e,
                    "tasks": [TASKS[e % 2]],
                    "length": LENGTHS[e],
                    "data/chunk_index": 0,
                    "data/file_index": f,
                    "dataset_from_index": index,
                    "dataset_to_index": index + LENGTHS[e],
                    "videos/observation.images.top/chunk_index": 0,
                    "videos/observation.images.top/file_index": f,
                    "videos/observation.images.top/from_timestamp": offset / FPS,
                    "videos/observation.images.top/to_timestamp": (offset + LENGTHS[e]) / FPS,
                }
            )
            offset += LENGTHS[e]
            index += LENGTHS[e]
    pq.write_table(pa.Table.from_pylist(rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task": list(TASKS), "task_index": [0, 1]}), root / "meta" / "tasks.parquet")
    return root


def make_v21(root: Path, codec: str = "mpeg4") -> Path:
    """One parquet and one mp4 per episode; the wrist camera is a video too."""
    feats = features()
    feats["observation.images.wrist"]["dtype"] = "video"
    info = {
        "codebase_version": "v2.1",
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": feats,
    }
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    lines, index = [], 0
    for e, length in enumerate(LENGTHS):
        table = frame_table([e], index).drop_columns(["observation.images.wrist"])
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{e:06d}.parquet")
        for cam, key in enumerate(("observation.images.top", "observation.images.wrist")):
            path = root / "videos" / "chunk-000" / key / f"episode_{e:06d}.mp4"
            write_mp4(path, [frame(e, t, cam) for t in range(length)], codec)
        lines.append(json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": length}))
        index += length
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta" / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(TASKS))
    )
    return root


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
