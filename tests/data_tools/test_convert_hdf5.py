"""robomimic / LIBERO and ALOHA HDF5 files, written here with h5py, arrive intact in vla_scale shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main
from data_tools.convert.common import PROGRESS_FILE
from tests.data_tools.sources.hdf5 import (
    ALOHA_LENGTHS,
    DEMOS,
    SIZE,
    frame,
    jpeg,
    make_aloha,
    make_robomimic,
    robomimic_state,
    series,
)
from vla_scale.data.format import Manifest, decode_episode


def read_episodes(out: Path) -> list:
    manifest = Manifest.load(out)
    urls = [str(out / s.path) for s in manifest.shards]
    return [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def convert(src: Path, out: Path, *extra: str, space: tuple[str, ...] = ("--no-binary-gripper",)) -> int:
    """The fixtures' actions are continuous in every dimension unless a test says otherwise (`space`)."""
    args = ["--image-ext", "png", "--episodes-per-shard", "2", *space, *extra]
    return main(["convert", "hdf5", str(src), str(out), *args])


def check_manifest(out: Path, episodes: int, frames_total: int, dims: tuple[int, int]) -> None:
    manifest = Manifest.load(out)
    assert manifest.num_samples == episodes
    assert sum(s.frames for s in manifest.shards) == frames_total
    assert manifest.cameras == ["rgb_static", "rgb_wrist"]
    assert (manifest.action_dim, manifest.state_dim, manifest.image_size) == (*dims, [SIZE, SIZE])
    assert manifest.extra["source_format"] == "hdf5"
    stats = json.loads((out / "stats.json").read_text())
    assert len(stats["action"]["mean"]) == dims[0] and len(stats["state"]["mean"]) == dims[1]
    assert not (out / PROGRESS_FILE).exists()


@pytest.fixture(scope="module")
def robomimic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_robomimic(
        tmp_path_factory.mktemp("robomimic") / "image.hdf5", env_args=json.dumps({"env_name": "Lift"})
    )


# -- robomimic ------------------------------------------------------------------------------


def test_robomimic_every_frame_action_state(robomimic: Path, tmp_path: Path) -> None:
    assert convert(robomimic, tmp_path / "out", "--instruction", "lift the cube") == 0
    check_manifest(tmp_path / "out", len(DEMOS), sum(DEMOS.values()), (7, 9))
    got = read_episodes(tmp_path / "out")
    assert [ep.key for ep in got] == ["demo_0", "demo_2", "demo_10"]  # numeric, not lexical, order
    for (n, length), ep in zip(DEMOS.items(), got, strict=True):
        assert ep.instruction == "lift the cube"
        assert ep.meta["group"] == f"data/demo_{n}"
        np.testing.assert_array_equal(ep.action, series(n, length, 7, 0.5))
        np.testing.assert_array_equal(ep.state, robomimic_state(n, length))
        for cam, name in enumerate(("rgb_static", "rgb_wrist")):
            assert len(ep.frames[name]) == length
            for t, img in enumerate(ep.frames[name]):
                np.testing.assert_array_equal(img, frame(n, t, cam))


def test_robomimic_without_instruction_is_refused(robomimic: Path, tmp_path: Path, capsys) -> None:
    assert convert(robomimic, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "--instruction" in err and "'Lift'" in err


def test_robomimic_options(robomimic: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = (
        "--instruction",
        "x",
        "--filter-key",
        "train",
        "--state-keys",
        "object",
        "--camera",
        "rgb_wrist=agentview_image",
    )
    assert convert(robomimic, out, *args) == 0
    got = read_episodes(out)
    assert [ep.key for ep in got] == ["demo_0", "demo_10"]
    np.testing.assert_array_equal(got[1].state, series(10, DEMOS[10], 5, -1.0))
    assert list(got[1].frames) == ["rgb_wrist"]
    np.testing.assert_array_equal(got[1].frames["rgb_wrist"][4], frame(10, 4, 0))


def test_bad_keys_give_clear_errors(robomimic: Path, tmp_path: Path, capsys) -> None:
    assert convert(robomimic, tmp_path / "a", "--instruction", "x", "--state-keys", "joints") == 2
    assert "'joints'" in (err := capsys.readouterr().err) and "robot0_eef_pos" in err
    assert convert(robomimic, tmp_path / "b", "--instruction", "x", "--camera", "rgb_static=nope") == 2
    assert "agentview_image" in capsys.readouterr().err
    assert convert(robomimic, tmp_path / "c", "--instruction", "x", "--filter-key", "valid") == 2
    assert "['train']" in capsys.readouterr().err


def test_libero_folder_instructions_from_attrs_and_flip(tmp_path: Path) -> None:
    """Two LIBERO-style files (other key names), each with its own problem_info instruction."""
    src = tmp_path / "libero"
    src.mkdir()
    tasks = ("put the bowl on the plate", "open the drawer")
    for i, task in enumerate(tasks):
        info = json.dumps({"problem_name": "x", "language_instruction": task})
        make_robomimic(src / f"task{i}_demo.hdf5", ("agentview_rgb", "eye_in_hand_rgb"), problem_info=info)
    assert convert(src, tmp_path / "out", "--flip-images") == 0
    check_manifest(tmp_path / "out", 2 * len(DEMOS), 2 * sum(DEMOS.values()), (7, 9))
    got = read_episodes(tmp_path / "out")
    assert [ep.key for ep in got][:3] == ["task0_demo_demo_0", "task0_demo_demo_2", "task0_demo_demo_10"]
    assert [ep.instruction for ep in got] == [tasks[0]] * 3 + [tasks[1]] * 3
    np.testing.assert_array_equal(got[4].state, robomimic_state(2, DEMOS[2]))
    np.testing.assert_array_equal(got[4].frames["rgb_wrist"][1], frame(2, 1, 1)[::-1, ::-1])


def test_workers_give_identical_shards(robomimic: Path, tmp_path: Path) -> None:
    common = ("--instruction", "lift", "--episodes-per-shard", "1", "--image-ext", "jpg")
    assert convert(robomimic, tmp_path / "w1", *common) == 0
    assert convert(robomimic, tmp_path / "w2", *common, "--workers", "2") == 0
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert len([n for n in names if n.endswith(".tar")]) == 3
    assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)


# -- ALOHA ----------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_aloha(tmp_path: Path, compress: bool) -> None:
    src = make_aloha(tmp_path / "aloha", compress)
    assert convert(src, tmp_path / "out", "--instruction", "transfer the cube") == 0
    check_manifest(tmp_path / "out", len(ALOHA_LENGTHS), sum(ALOHA_LENGTHS), (14, 14))
    got = read_episodes(tmp_path / "out")
    assert [ep.key for ep in got] == ["episode_0", "episode_1"]
    for ep_i, (length, ep) in enumerate(zip(ALOHA_LENGTHS, got, strict=True)):
        assert ep.instruction == "transfer the cube" and ep.meta["layout"] == "aloha"
        np.testing.assert_array_equal(ep.action, series(ep_i, length, 14, 0.3))
        np.testing.assert_array_equal(ep.state, series(ep_i, length, 14, 0.1))
        for cam, name in enumerate(("rgb_static", "rgb_wrist")):  # cam_high, cam_left_wrist
            assert len(ep.frames[name]) == length
            for t, img in enumerate(ep.frames[name]):
                want = frame(ep_i, t, cam)
                if compress:  # the JPEG decoded exactly (PNG output), close to the original
                    np.testing.assert_array_equal(img, np.asarray(Image.open(io.BytesIO(jpeg(want)))))
                    assert np.abs(img.astype(int) - want).mean() < 6
                else:
                    np.testing.assert_array_equal(img, want)


def test_aloha_needs_instruction_and_extra_camera(tmp_path: Path, capsys) -> None:
    src = make_aloha(tmp_path / "aloha", compress=True)
    assert convert(src, tmp_path / "a") == 2
    assert "--instruction" in capsys.readouterr().err
    out = tmp_path / "b"
    cams = ("--camera", "rgb_static=cam_high", "--camera", "rgb_wrist_right=cam_right_wrist")
    assert convert(src / "episode_1.hdf5", out, "--instruction", "x", "--state-keys", "qpos,qvel", *cams) == 0
    (ep,) = read_episodes(out)
    assert ep.state.shape == (4, 28)
    np.testing.assert_array_equal(ep.state[:, 14:], series(1, 4, 14, 0.2))
    assert np.abs(ep.frames["rgb_wrist_right"][2].astype(int) - frame(1, 2, 2)).mean() < 6
