"""A CALVIN split (per-frame npz + pickled language annotations) becomes one episode per annotated segment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.convert.common import PROGRESS_FILE
from tests.data_tools.sources.calvin import SEGMENTS, TASKS, TEXTS, image, make_calvin, vec, with_gripper
from vla_scale.data.format import Manifest, decode_episode


def read_episodes(out: Path) -> list:
    manifest = Manifest.load(out)
    urls = [str(out / s.path) for s in manifest.shards]
    return [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def convert(src: Path, out: Path, *extra: str) -> int:
    return main(["convert", "calvin", str(src), str(out), "--image-ext", "png", "--episodes-per-shard", "2", *extra])


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_calvin(tmp_path_factory.mktemp("calvin") / "training")


def test_refuses_pickle_without_flag(src: Path, tmp_path: Path, capsys) -> None:
    assert convert(src, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "auto_lang_ann.npy is a pickle" in err and "arbitrary code" in err and "--trust-pickle" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["convert", "calvin", "--help"])
    assert (
        "--trust-pickle" in (help_text := capsys.readouterr().out) and "pickle" in help_text.split("--trust-pickle")[-1]
    )


def test_segments_become_episodes(src: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert convert(src, out, "--trust-pickle") == 0
    manifest = Manifest.load(out)
    lengths = [e - s + 1 for s, e in SEGMENTS]
    assert manifest.num_samples == 3 and sum(s.frames for s in manifest.shards) == sum(lengths) == 14
    assert manifest.cameras == ["rgb_static", "rgb_wrist"]
    assert (manifest.action_dim, manifest.state_dim, manifest.image_size) == (7, 15, [20, 20])
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == 7 and len(stats["state"]["std"]) == 15
    assert not (out / PROGRESS_FILE).exists()
    got = read_episodes(out)
    assert [ep.key for ep in got] == ["seg0000000", "seg0000001", "seg0000002"]
    for i, ((start, end), ep) in enumerate(zip(SEGMENTS, got, strict=True)):
        ids = range(start, end + 1)
        assert ep.instruction == TEXTS[i]
        assert (ep.meta["task"], ep.meta["start"], ep.meta["end"]) == (TASKS[i], start, end)
        action = np.stack([with_gripper(vec(f, 7, 0.01), f) for f in ids]).astype(np.float32)
        state = np.stack([with_gripper(vec(f, 15, 1.0), f) for f in ids]).astype(np.float32)
        np.testing.assert_array_equal(ep.action[:, :-1], action[:, :-1])
        np.testing.assert_array_equal(ep.state[:, :-1], state[:, :-1])
        # CALVIN's +1 open / -1 close becomes vla_scale's 1 closed / 0 open
        np.testing.assert_array_equal(ep.action[:, -1], (action[:, -1] < 0).astype(np.float32))
        np.testing.assert_array_equal(ep.state[:, -1], (state[:, -1] < 0).astype(np.float32))
        assert len(ep.frames["rgb_static"]) == len(ep.frames["rgb_wrist"]) == len(ids)
        for t, f in enumerate(ids):
            np.testing.assert_array_equal(ep.frames["rgb_static"][t], image(f, 20, 0))
            np.testing.assert_array_equal(ep.frames["rgb_wrist"][t], image(f, 8, 1))


def test_action_key_state_keys_and_workers(src: Path, tmp_path: Path) -> None:
    args = ("--trust-pickle", "--action-key", "actions", "--state-keys", "robot_obs,scene_obs", "--image-ext", "jpg")
    args += ("--gripper", "keep")
    assert convert(src, tmp_path / "w1", *args) == 0
    assert convert(src, tmp_path / "w2", *args, "--workers", "2") == 0
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)
    ep = read_episodes(tmp_path / "w1")[1]
    np.testing.assert_array_equal(ep.action[2], with_gripper(vec(105, 7, 2.0), 105).astype(np.float32))
    np.testing.assert_array_equal(
        ep.state[2], np.concatenate([with_gripper(vec(105, 15, 1.0), 105), vec(105, 24, -1.0)]).astype(np.float32)
    )


def test_missing_frame_and_bad_key_errors(src: Path, tmp_path: Path, capsys) -> None:
    assert convert(src, tmp_path / "a", "--trust-pickle", "--state-keys", "joints") == 2
    assert "'joints'" in (err := capsys.readouterr().err) and "robot_obs" in err
    broken = make_calvin(tmp_path / "broken")
    (broken / "episode_0000110.npz").unlink()
    assert convert(broken, tmp_path / "b", "--trust-pickle") == 2
    assert "episode_0000110.npz not found" in capsys.readouterr().err
