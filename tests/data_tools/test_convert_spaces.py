"""Converters declare the action/state space: flags, refusals where the data contradicts the old guess, the
declaration in the manifest, and `inspect` / `verify` printing it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.synth import synth
from tests.data_tools.sources.calvin import make_calvin
from tests.data_tools.sources.hdf5 import ALOHA_LENGTHS, aloha_action, make_aloha
from tests.data_tools.sources.lerobot import LENGTHS, action, make_v3
from vla_scale.data.format import Manifest, decode_episode, load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.data.reader import BadSamples, Reader
from vla_scale.data.spaces import Space, Spaces
from vla_scale.data.stream import SourceStream


def episodes(out: Path) -> list:
    urls = [str(out / s.path) for s in Manifest.load(out).shards]
    return [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


@pytest.fixture(scope="module")
def so100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeRobot v3 set whose last action joint is a continuous gripper (-0.54..1.0), as SO-100 arms record."""
    return make_v3(tmp_path_factory.mktemp("so100") / "v3", codec="mpeg4", continuous_gripper=True)


def test_continuous_last_dim_without_a_flag_is_refused_naming_the_flags(so100: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["convert", "lerobot", str(so100), str(out)]) == 2
    err = capsys.readouterr().err
    assert "the last action dimension takes values -0.54.." in err
    assert "--binary-gripper-dims" in err and "--no-binary-gripper" in err
    assert not (out / "manifest.json").exists()


def test_continuous_gripper_is_declared_regressed_and_normalised_like_a_joint(
    so100: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    args = ["--no-binary-gripper", "--normalization", "min_max", "--action-mode", "absolute"]
    assert main(["convert", "lerobot", str(so100), str(out), *args]) == 0
    assert "binary: none" in capsys.readouterr().out  # the converter's report prints the declaration
    spaces = Manifest.load(out).robot_spaces
    assert spaces == Spaces(Space(3), Space(4), "min_max", "absolute") and spaces.declared
    assert spaces.model_dims() == {"action_dim": 3, "state_dim": 4, "binary_dims": 0, "binary_state_dims": 0}
    # The training stream regresses the gripper: min/max scaled to [-1, 1], not thresholded.
    stream = SourceStream(out, Reader(), 0, 1, False, 1, 1, BadSamples())
    grip = np.array([w.action[0, 0, -1] for w in stream._epoch_items()])
    raw = np.array([action(e, t, True)[-1] for e in range(3) for t in range(LENGTHS[e])], np.float32)
    np.testing.assert_allclose(grip, 2 * (raw + 0.54) / 1.54 - 1, atol=1e-4)
    assert grip.min() == pytest.approx(-1, abs=1e-4) and len(set(np.round(grip, 3))) > 2


def test_bimanual_hdf5_declares_two_binary_grippers_and_round_trips(tmp_path: Path, capsys) -> None:
    src = make_aloha(tmp_path / "aloha", compress=False, binary_grippers=True)
    out = tmp_path / "out"
    args = ["--instruction", "transfer the cube", "--binary-gripper-dims", "6,13"]
    assert main(["convert", "hdf5", str(src), str(out), *args]) == 0
    spaces = Manifest.load(out).robot_spaces
    assert spaces.action.binary == (6, 13) and spaces.state.binary == ()
    assert spaces.model_dims()["binary_dims"] == 2
    norm = Normalizer(load_stats(out), spaces)
    for ep, got in enumerate(episodes(out)):
        raw = aloha_action(ep, ALOHA_LENGTHS[ep], True)
        np.testing.assert_array_equal(got.action, raw)
        normed = norm.normalize_action(got.action)
        np.testing.assert_array_equal(normed[:, 12:], raw[:, [6, 13]])  # the two grippers last, as 0/1
        np.testing.assert_allclose(norm.unnormalize_action(normed[:, :12], normed[:, 12:]), raw, atol=1e-4)
    # Without the flag, guessing only the last dim binary would regress the first arm's gripper: refused.
    capsys.readouterr()
    assert main(["convert", "hdf5", str(src), str(tmp_path / "b"), "--instruction", "x"]) == 2
    err = capsys.readouterr().err
    assert "action dimensions [6] also switch between two values" in err and "--binary-gripper-dims" in err
    # A dimension the data does not have is named.
    assert main(["convert", "hdf5", str(src), str(tmp_path / "c"), "--instruction", "x", "--binary-gripper-dims", "14"])
    assert "binary action dimensions [14] do not exist (14 dims)" in capsys.readouterr().err


def test_calvin_declares_its_binary_gripper_and_relative_actions(tmp_path: Path) -> None:
    src = make_calvin(tmp_path / "training")
    out = tmp_path / "out"
    assert main(["convert", "calvin", str(src), str(out), "--trust-pickle"]) == 0
    spaces = Manifest.load(out).robot_spaces
    assert (spaces.action.binary, spaces.state.binary, spaces.action_mode) == ((6,), (14,), "relative")
    kept = tmp_path / "kept"
    assert main(["convert", "calvin", str(src), str(kept), "--trust-pickle", "--gripper", "keep"]) == 0
    action = Manifest.load(kept).robot_spaces.action
    assert (action.threshold, action.binary_values) == (0.0, (-1.0, 1.0))  # CALVIN's +1 open / -1 close


def test_inspect_and_verify_print_the_declared_space(tmp_path: Path, capsys) -> None:
    synth(tmp_path, episodes=3, vl_samples=0, image_size=16, progress=False)
    assert main(["inspect", str(tmp_path / "robot"), "--episodes", "1", "--out", str(tmp_path / "fig")]) == 0
    out = capsys.readouterr().out
    assert "spaces:      declared; normalization mean_std; actions relative" in out
    assert "action:    4 dims; regressed: 0 (dx), 1 (dy), 2 (dz); binary: 3 (gripper) (> 0.5 → 1, else 0)" in out
    assert main(["verify", str(tmp_path / "robot")]) == 0
    assert "state:     4 dims; regressed: 0 (x), 1 (y), 2 (z); binary: 3 (gripper)" in capsys.readouterr().out
