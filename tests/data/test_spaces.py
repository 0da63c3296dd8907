"""Declared action/state spaces: manifest round trip, legacy reading, normalisation modes and the dimension order."""

import json

import numpy as np
import pytest

from data_tools.space_choice import SpaceChoice
from data_tools.writer import ShardWriter
from tests.data.toy_shards import make_episode, write_robot
from vla_scale.data.format import FormatError, Manifest, load_stats
from vla_scale.data.normalize import Normalizer, constant_dims
from vla_scale.data.reader import BadSamples, Reader
from vla_scale.data.spaces import NORMALIZATIONS, Space, Spaces
from vla_scale.data.stream import SourceStream


def stats_of(x: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "mean": x.mean(0).astype(np.float32),
        "std": x.std(0).astype(np.float32),
        "min": x.min(0).astype(np.float32),
        "max": x.max(0).astype(np.float32),
        "q01": np.quantile(x, 0.01, axis=0).astype(np.float32),
        "q99": np.quantile(x, 0.99, axis=0).astype(np.float32),
    }


def bimanual(n: int = 200) -> np.ndarray:
    """14 dims: two arms of 6 joints + a binary gripper each (dims 6 and 13), joints on different scales."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 14)).astype(np.float32) * np.arange(1, 15, dtype=np.float32) + 3
    x[:, 6] = rng.integers(0, 2, n)
    x[:, 13] = rng.integers(0, 2, n)
    return x


@pytest.mark.parametrize("mode", NORMALIZATIONS)
def test_every_normalization_round_trips_with_two_binary_grippers_reordered(mode: str) -> None:
    x = bimanual()
    spaces = Spaces(Space(14, (6, 13)), Space(4), normalization=mode)
    norm = Normalizer({"action": stats_of(x), "state": stats_of(x[:, :4])}, spaces)
    out = norm.normalize_action(x)
    regressed = [d for d in range(14) if d not in (6, 13)]
    np.testing.assert_array_equal(out[:, 12:], x[:, [6, 13]])  # binary dims last, as 0/1 targets
    if mode == "mean_std":
        np.testing.assert_allclose(out[:, :12].mean(0), 0, atol=1e-4)
    else:
        assert out[:, :12].min() >= -1 and out[:, :12].max() <= 1
        if mode == "min_max":
            np.testing.assert_allclose(out[:, :12].min(0), -1, atol=1e-4)
    back = norm.unnormalize_action(out[:, :12], out[:, 12:])
    inside = np.ones(len(x), bool)
    if mode == "q01_q99":  # values beyond the percentiles are clipped: only the others come back exactly
        s = stats_of(x)
        inside = ((x[:, regressed] >= s["q01"][regressed]) & (x[:, regressed] <= s["q99"][regressed])).all(1)
        assert 0 < inside.sum() < len(x)
    np.testing.assert_allclose(back[inside], x[inside], rtol=1e-5, atol=1e-4)


def test_no_binary_dim_regresses_every_dimension_and_legacy_binarises_the_last() -> None:
    x = bimanual()[:, :7]
    x[:, -1] = np.linspace(-0.54, 1.0, len(x))  # a continuous gripper (SO-100 style)
    stats = {"action": stats_of(x), "state": stats_of(x)}
    declared = Normalizer(stats, Spaces(Space(7), Space(7)))
    np.testing.assert_allclose(declared.normalize_action(x)[:, -1].std(), 1, atol=1e-3)  # z-scored, not 0/1
    legacy = Normalizer(stats)
    assert legacy.spaces == Spaces.legacy(7, 7) and not legacy.spaces.declared
    assert set(legacy.normalize_action(x)[:, -1].tolist()) == {0.0, 1.0}
    assert constant_dims(stats, Spaces(Space(7), Space(7))) == {"action": [], "state": []}


def test_manifest_declaration_round_trips_and_a_legacy_manifest_reads_as_before(tmp_path) -> None:
    legacy = write_robot(tmp_path / "legacy", [5, 6], per_shard=2)
    manifest = Manifest.load(legacy)
    assert manifest.spaces == {} and manifest.robot_spaces == Spaces.legacy(4, 4)

    spaces = Spaces(Space(4, (1,), 0.5, names=("x", "grip", "y", "z")), Space(4), "min_max", "relative")
    with ShardWriter(tmp_path / "declared", "d", "robot", spaces=spaces) as w:
        for i in range(2):
            w.write_episode(make_episode(i, 5))
    assert Manifest.load(tmp_path / "declared").robot_spaces == spaces
    # The stream normalises with the declaration: regressed x, y, z first, then the binary dim 1.
    stream = SourceStream(tmp_path / "declared", Reader(), 0, 1, False, 1, 1, BadSamples())
    assert stream.normalizer.spaces == spaces
    window = next(iter(stream._epoch_items()))
    raw = make_episode(0, 5).action[0]
    expected = Normalizer(load_stats(tmp_path / "declared"), spaces).normalize_action(raw)
    np.testing.assert_array_equal(window.action[0, 0], expected)
    assert expected[-1] == (raw[1] > 0.5)


def test_a_bad_declaration_is_refused_on_read(tmp_path) -> None:
    folder = write_robot(tmp_path, [5], per_shard=1)
    data = json.loads((folder / "manifest.json").read_text())
    data["spaces"] = {"action": {"binary": [9]}, "state": {}}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match=r"binary dimensions \[9\] must be distinct and in 0..3"):
        Manifest.load(folder)
    data["spaces"] = {"normalization": "zscore"}
    (folder / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(FormatError, match="normalization 'zscore'"):
        Manifest.load(folder)


def test_writer_refuses_a_continuous_last_dim_without_a_declaration(tmp_path) -> None:
    ep = make_episode(0, 5)
    ep.action[:, -1] = np.linspace(-0.54, 1.0, 5)
    with pytest.raises(FormatError, match="--binary-gripper-dims I,J .* or --no-binary-gripper"):
        with ShardWriter(tmp_path / "a", "a", "robot", spaces=SpaceChoice()) as w:
            w.write_episode(ep)
    with ShardWriter(tmp_path / "b", "b", "robot", spaces=SpaceChoice(action_binary=())) as w:
        w.write_episode(ep)
    assert Manifest.load(tmp_path / "b").robot_spaces.action.binary == ()
    ep.action[:, -1] = [1, -1, -1, 1, 1]  # a signed binary gripper: threshold 0, given back as -1 / 1
    with ShardWriter(tmp_path / "c", "c", "robot", spaces=SpaceChoice()) as w:
        w.write_episode(ep)
    action = Manifest.load(tmp_path / "c").robot_spaces.action
    assert (action.binary, action.threshold, action.binary_values) == ((3,), 0.0, (-1.0, 1.0))


def test_each_binary_dim_keeps_its_own_threshold_and_values(tmp_path) -> None:
    """Two grippers in two conventions (dim 6: 0/1, dim 13: -1/1): one threshold for both would misread one."""
    x = bimanual()
    x[:, 13] = np.where(x[:, 13] > 0, 1.0, -1.0)
    x[:, 6] = np.where(x[:, 6] > 0, 0.9, 0.1)  # a 0..1 command that is only near its ends: 0.5 splits it
    space = Space(14, (6, 13), (0.5, 0.0), ((0.0, 1.0), (-1.0, 1.0)))
    norm = Normalizer({"action": stats_of(x), "state": stats_of(x[:, :4])}, Spaces(space, Space(4)))
    out = norm.normalize_action(x)
    np.testing.assert_array_equal(out[:, 12], x[:, 6] > 0.5)
    np.testing.assert_array_equal(out[:, 13], x[:, 13] > 0)
    back = norm.unnormalize_action(out[:, :12], out[:, 12:])
    np.testing.assert_array_equal(back[:, 13], x[:, 13])  # -1 / 1 again, not 0 / 1
    np.testing.assert_array_equal(back[:, 6], (x[:, 6] > 0.5).astype(np.float32))
    assert "6: > 0.5 → 1, else 0; 13: > 0 → 1, else -1" in space.describe()
    with pytest.raises(FormatError, match=r"3 thresholds for 2 binary dimensions \[6, 13\]"):
        Space(14, (6, 13), (0.5, 0.0, 0.0))
    with pytest.raises(FormatError, match="one such pair per binary dimension"):
        Space(14, (6, 13), 0.5, ((0.0, 1.0),))

    # The writer infers each dimension's convention, takes one threshold per dimension from the command line
    # (`--gripper-threshold 0.5,0`), and the manifest round-trips it.
    ep = make_episode(0, 6, action_dim=5)
    ep.action[:, 1] = [0, 1, 1, 0, 0, 1]
    ep.action[:, 4] = [1, -1, -1, 1, 1, -1]
    with ShardWriter(tmp_path / "a", "a", "robot", spaces=SpaceChoice(action_binary=(1, 4))) as w:
        w.write_episode(ep)
    action = Manifest.load(tmp_path / "a").robot_spaces.action
    assert (action.threshold, action.binary_values) == ((0.5, 0.0), ((0.0, 1.0), (-1.0, 1.0)))
    choice = SpaceChoice(action_binary=(1, 4), threshold=(0.25, -0.5))
    with ShardWriter(tmp_path / "b", "b", "robot", spaces=choice) as w:
        w.write_episode(ep)
    assert Manifest.load(tmp_path / "b").robot_spaces.action.thresholds == (0.25, -0.5)
    with pytest.raises(FormatError, match="--gripper-threshold gives 3 thresholds, the action has 2 binary"):
        with ShardWriter(tmp_path / "c", "c", "robot", spaces=SpaceChoice((1, 4), threshold=(0.5, 0, 0))) as w:
            w.write_episode(ep)
