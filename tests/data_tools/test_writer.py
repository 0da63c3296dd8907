"""ShardWriter writes what the format module reads back, through plain tarfile and webdataset."""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.writer import DatasetWriteError, ShardWriter
from vla_scale.data.format import (
    Episode,
    FormatError,
    Manifest,
    VLSample,
    decode_episode,
    decode_vl,
    load_stats,
)


def make_episode(i: int, length: int | None = None, size: int = 16) -> Episode:
    rng = np.random.default_rng(i)
    length = length or int(rng.integers(3, 7))
    frames = {
        cam: [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(length)]
        for cam in ("rgb_static", "rgb_wrist")
    }
    action = rng.normal(size=(length, 4)).astype(np.float32)
    action[:, 3] = rng.integers(0, 2, length)
    state = rng.normal(size=(length, 4)).astype(np.float32)
    return Episode(f"ep{i:04d}", f"task {i}", action, state, frames, {"source": "test", "i": i})


def write_episodes(out: Path, episodes: list[Episode], **kw) -> Manifest:
    kw.setdefault("image_ext", "png")
    with ShardWriter(out, "test_robot", "robot", **kw) as writer:
        for ep in episodes:
            writer.write_episode(ep)
    assert writer.manifest is not None
    return writer.manifest


def read_tar(path: Path) -> list[dict]:
    """Group tar members into samples by key (text before the first dot), as webdataset does."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
    return list(samples.values())


def assert_same_episode(a: Episode, b: Episode) -> None:
    assert (a.key, a.instruction, a.meta) == (b.key, b.instruction, b.meta)
    np.testing.assert_array_equal(a.action, b.action)
    np.testing.assert_array_equal(a.state, b.state)
    assert sorted(a.frames) == sorted(b.frames)
    for cam in a.frames:
        for x, y in zip(a.frames[cam], b.frames[cam], strict=True):
            np.testing.assert_array_equal(x, y)


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_round_trip_tarfile_and_webdataset(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(5)]
    manifest = write_episodes(tmp_path, episodes, max_samples=2)

    assert [s.path for s in manifest.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [s.samples for s in manifest.shards] == [2, 2, 1]
    assert [s.frames for s in manifest.shards] == [
        sum(e.length for e in episodes[0:2]),
        sum(e.length for e in episodes[2:4]),
        episodes[4].length,
    ]
    assert (manifest.cameras, manifest.action_dim, manifest.state_dim) == (["rgb_static", "rgb_wrist"], 4, 4)
    assert manifest.image_size == [16, 16]
    assert Manifest.load(tmp_path) == manifest
    assert not list(tmp_path.glob("*.tmp"))

    from_tar = [decode_episode(s) for shard in manifest.shards for s in read_tar(tmp_path / shard.path)]
    urls = [str(tmp_path / s.path) for s in manifest.shards]
    from_wds = [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert len(from_tar) == len(from_wds) == manifest.num_samples == len(episodes)
    for ep, a, b in zip(episodes, from_tar, from_wds, strict=True):
        assert_same_episode(ep, a)
        assert_same_episode(ep, b)


def test_stats_match_numpy(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(4)]
    write_episodes(tmp_path, episodes)
    stats = load_stats(tmp_path)
    assert set(stats) == {"action", "state"}
    for name in ("action", "state"):
        x = np.concatenate([getattr(e, name) for e in episodes]).astype(np.float64)
        expected = {
            "mean": x.mean(0),
            "std": x.std(0),
            "min": x.min(0),
            "max": x.max(0),
            "q01": np.quantile(x, 0.01, axis=0),
            "q99": np.quantile(x, 0.99, axis=0),
        }
        for key, value in expected.items():
            np.testing.assert_allclose(stats[name][key], value, rtol=1e-6, atol=1e-6, err_msg=f"{name}.{key}")


def test_jpg_frames_within_tolerance(tmp_path: Path) -> None:
    ep = make_episode(0, length=3, size=32)
    yy, xx = np.mgrid[0:32, 0:32]
    smooth = np.stack([xx * 8, yy * 8, (xx + yy) * 4], axis=-1).astype(np.uint8)  # JPEG-friendly content
    ep.frames = {"rgb_static": [smooth] * 3}
    write_episodes(tmp_path, [ep], image_ext="jpg")
    (back,) = [decode_episode(s) for s in read_tar(tmp_path / "shard-000000.tar")]
    with tarfile.open(tmp_path / "shard-000000.tar") as tar:
        assert sum(name.endswith(".jpg") for name in tar.getnames()) == 3
    for frame in back.frames["rgb_static"]:
        assert np.abs(frame.astype(int) - smooth.astype(int)).mean() < 3.0


def test_vl_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    samples = [
        VLSample(
            f"vl{i:03d}",
            rng.integers(0, 256, (8, 12, 3), dtype=np.uint8),
            [{"from": "human", "value": f"<image>\nquestion {i}?"}, {"from": "gpt", "value": f"answer {i}"}],
        )
        for i in range(5)
    ]
    with ShardWriter(tmp_path, "test_vl", "vl", max_samples=3, image_ext="png") as writer:
        for s in samples:
            writer.write_vl(s)
    manifest = Manifest.load(tmp_path)
    assert (manifest.kind, manifest.num_samples, manifest.image_size) == ("vl", 5, [8, 12])
    assert not (tmp_path / "stats.json").exists()
    urls = [str(tmp_path / s.path) for s in manifest.shards]
    back = [decode_vl(s) for s in wds.WebDataset(urls, shardshuffle=False)]
    for a, b in zip(samples, back, strict=True):
        assert (a.key, a.conversations) == (b.key, b.conversations)
        np.testing.assert_array_equal(a.image, b.image)


def test_rotation_by_bytes(tmp_path: Path) -> None:
    episodes = [make_episode(i, length=4) for i in range(3)]
    manifest = write_episodes(tmp_path, episodes, max_bytes=1)  # every sample fills a shard
    assert [s.samples for s in manifest.shards] == [1, 1, 1]
    single = write_episodes(tmp_path / "one", episodes, max_bytes=None)
    assert [s.samples for s in single.shards] == [3]


def test_deterministic_bytes(tmp_path: Path) -> None:
    episodes = [make_episode(i) for i in range(4)]
    write_episodes(tmp_path / "a", episodes, max_samples=3)
    write_episodes(tmp_path / "b", episodes, max_samples=3)
    assert sha256s(tmp_path / "a") == sha256s(tmp_path / "b")


def test_exception_leaves_no_manifest_or_partial_shard(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(tmp_path, "x", "robot", max_samples=2, image_ext="png") as writer:
            for i in range(3):
                writer.write_episode(make_episode(i))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar"]


def test_bad_samples_are_rejected(tmp_path: Path) -> None:
    with ShardWriter(tmp_path, "x", "robot", image_ext="png") as writer:
        writer.write_episode(make_episode(0))
        with pytest.raises(FormatError, match="duplicate sample key"):
            writer.write_episode(make_episode(0))
        bad = make_episode(1)
        bad.action = bad.action[:, :3]
        with pytest.raises(FormatError, match="action dim 3"):
            writer.write_episode(bad)
        nan = make_episode(2)
        nan.state[0, 0] = np.nan
        with pytest.raises(FormatError, match="NaN"):
            writer.write_episode(nan)
        dotted = make_episode(3)
        dotted.key = "ep.3"
        with pytest.raises(FormatError, match="sample key"):
            writer.write_episode(dotted)
    assert Manifest.load(tmp_path).num_samples == 1


def test_bad_output_path_is_clear(tmp_path: Path) -> None:
    a_file = tmp_path / "file.txt"
    a_file.write_text("not a folder")
    with pytest.raises(DatasetWriteError, match=r"cannot create dataset folder .*file\.txt.*choose another"):
        ShardWriter(a_file / "ds", "x", "robot")
    with pytest.raises(DatasetWriteError, match="is not a folder"):
        ShardWriter(a_file, "x", "robot")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores folder permissions")
def test_read_only_folder_is_clear(tmp_path: Path) -> None:
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(DatasetWriteError, match="cannot write into dataset folder .*permissions"):
            ShardWriter(tmp_path, "x", "robot")
    finally:
        tmp_path.chmod(0o755)


def test_unwritable_folder_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same check as above, simulated, so it also runs as root (CI containers)."""

    def denied(self: Path, data: bytes) -> int:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "write_bytes", denied)
    with pytest.raises(DatasetWriteError, match="cannot write into dataset folder .*Permission denied.*permissions"):
        ShardWriter(tmp_path, "x", "robot")


def test_existing_dataset_needs_overwrite(tmp_path: Path) -> None:
    write_episodes(tmp_path, [make_episode(0), make_episode(1)], max_samples=1)
    with pytest.raises(DatasetWriteError, match="already holds a dataset.*overwrite"):
        ShardWriter(tmp_path, "x", "robot")
    manifest = write_episodes(tmp_path, [make_episode(2)], overwrite=True)
    assert [s.path for s in manifest.shards] == ["shard-000000.tar"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "shard-000000.tar", "stats.json"]
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][0]["samples"] == 1
