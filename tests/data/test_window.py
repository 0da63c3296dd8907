"""Windowing with chunked future actions, and normalisation from stats.json."""

import itertools
from collections import Counter

import numpy as np

from tests.data.toy_shards import make_episode, write_robot
from vla_scale.data import stream as stream_module
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import Normalizer, constant_dims
from vla_scale.data.reader import BadSamples, Reader
from vla_scale.data.stream import SourceStream
from vla_scale.data.window import chunk_actions


def test_chunk_actions_and_mask_at_episode_end():
    action = np.arange(10, dtype=np.float32).reshape(5, 2)
    chunks, mask = chunk_actions(action, 3)
    assert chunks.shape == (5, 3, 2) and mask.shape == (5, 3)
    np.testing.assert_array_equal(chunks[1], action[1:4])
    np.testing.assert_array_equal(chunks[3, :2], action[3:5])
    np.testing.assert_array_equal(chunks[3, 2], 0)
    assert mask[2].all() and mask[3].tolist() == [True, True, False] and mask[4].tolist() == [True, False, False]


def windows_of(folder, window_size: int, chunk: int) -> list:
    """Windows the training stream cuts from a dataset, in reading order, unnormalised for comparison."""
    s = SourceStream(folder, Reader(), 0, 1, False, window_size, chunk, BadSamples())
    s.normalizer = Normalizer(load_stats(folder))
    s.normalizer.normalize_action = lambda a: a  # compare with the raw episode values
    s.normalizer.normalize_state = lambda x: x
    return list(s._epoch_items()), s.bad


def test_windows_cover_every_start_with_matching_frames_state_and_chunks(tmp_path):
    write_robot(tmp_path, [6], per_shard=1)
    ep = make_episode(0, length=6)
    windows, _ = windows_of(tmp_path, window_size=2, chunk=3)
    assert [w.key for w in windows] == [f"ep0000/{s}" for s in range(5)]
    w = windows[4]  # frames 4, 5
    assert w.images.shape == (2, 16, 16, 3) and w.state.shape == (2, 4) and w.action.shape == (2, 3, 4)
    np.testing.assert_array_equal(w.images[1], ep.frames["rgb_static"][5])
    np.testing.assert_array_equal(w.state, ep.state[4:6])
    np.testing.assert_array_equal(w.action[0, :2], ep.action[4:6])
    assert w.action_mask.tolist() == [[True, True, False], [True, False, False]]
    assert w.wrist_images is None


def test_short_episode_yields_no_window(tmp_path):
    write_robot(tmp_path, [2, 4], per_shard=2)
    windows, bad = windows_of(tmp_path, window_size=3, chunk=1)
    assert [w.key for w in windows] == ["ep0001/0", "ep0001/1"] and not bad.counts


def test_normalizer_zscores_arm_and_binarises_gripper(tmp_path):
    write_robot(tmp_path, [5, 7, 9], per_shard=2)
    stats = load_stats(tmp_path)
    norm = Normalizer(stats)
    raw = np.concatenate([make_episode(i, n).action for i, n in enumerate([5, 7, 9])])
    out = norm.normalize_action(raw)
    np.testing.assert_allclose(out[:, :-1].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(out[:, :-1].std(0), 1, atol=1e-3)
    assert set(np.unique(out[:, -1]).tolist()) <= {0.0, 1.0}
    back = norm.unnormalize_action(out[:, :-1], out[:, -1:])
    np.testing.assert_allclose(back, raw, atol=1e-4)


def test_normalizer_keeps_gripper_state_binary(tmp_path):
    write_robot(tmp_path, [5, 7], per_shard=2)
    stats = load_stats(tmp_path)
    norm = Normalizer(stats)
    state = make_episode(1, 7).state.copy()
    state[:, -1] = [0, 1, 0, 1, 1, 0, 0.7]
    out = norm.normalize_state(state)
    assert out[:, -1].tolist() == [0, 1, 0, 1, 1, 0, 1]
    mean, std = stats["state"]["mean"][0], stats["state"]["std"][0]
    np.testing.assert_allclose(out[:, 0], (state[:, 0] - mean) / (std + 1e-6), rtol=1e-5)


def test_normalizer_treats_constant_dimensions_as_std_one_and_round_trips(tmp_path):
    """A dimension with (near) zero std is normalised to `value - mean` (0 on the data), never divided by ~0."""
    write_robot(tmp_path, [5, 7], per_shard=2)
    stats = load_stats(tmp_path)
    stats["action"]["std"][1] = 0.0
    stats["state"]["std"][2] = 1e-9
    assert constant_dims(stats) == {"action": [1], "state": [2]}
    norm = Normalizer(stats)
    action = make_episode(0, 5).action.copy()
    action[:, 1] = stats["action"]["mean"][1] + np.float32(1e-3)  # an unseen value on the constant dimension
    out = norm.normalize_action(action)
    np.testing.assert_allclose(out[:, 1], 1e-3, rtol=1e-3)  # std 1, not 1e-3 / 1e-6 = 1000
    np.testing.assert_allclose(norm.unnormalize_action(out[:, :-1], out[:, -1:])[:, :-1], action[:, :-1], atol=1e-5)
    state = norm.normalize_state(make_episode(0, 5).state)
    assert np.isfinite(state).all() and np.abs(state[:, 2]).max() < 10


def test_manifest_records_each_shards_longest_episode_for_the_prepare_checks(tmp_path):
    from vla_scale.data.format import Manifest, ShardInfo

    write_robot(tmp_path, [2, 4, 7], per_shard=2)
    shards = Manifest.load(tmp_path).shards
    assert [(s.max_length, s.longest_episode()) for s in shards] == [(4, 4), (7, 7)]
    # A manifest from before max_length was recorded: an upper bound (every other episode has >= 1 step).
    assert ShardInfo("old.tar", samples=3, frames=13).longest_episode() == 11


def test_overlapping_windows_decode_each_frame_once_and_match_decoding_per_window(tmp_path, monkeypatch):
    write_robot(tmp_path, [6, 7], per_shard=1)
    calls = Counter()
    real = stream_module.decode_frame

    def counting(raw, meta, camera, t):
        calls[(raw["__key__"], camera, t)] += 1
        return real(raw, meta, camera, t)

    monkeypatch.setattr(stream_module, "decode_frame", counting)

    def run(buffer: int) -> tuple[list, SourceStream]:
        s = SourceStream(tmp_path, Reader(), 0, buffer, False, 3, 2, BadSamples())
        return (list(s._epoch_items()) if buffer == 1 else list(itertools.islice(iter(s), 20))), s

    cached, stream = run(1)
    assert len(calls) == 13 and set(calls.values()) == {1}  # 6 + 7 frames, each decoded once for 4 + 5 windows
    assert stream.cached_bytes == 0  # every frame released once its last window left
    shuffled, _ = run(4)  # shuffle buffer: windows of one episode leave out of order, across epochs
    monkeypatch.setattr(stream_module, "FRAME_CACHE_BYTES", 0)  # nothing kept: a decode per window and frame
    calls.clear()
    plain, _ = run(1)
    assert sum(calls.values()) == 9 * 3
    plain_shuffled, _ = run(4)
    for a, b in zip(cached + shuffled, plain + plain_shuffled, strict=True):
        assert a.key == b.key
        np.testing.assert_array_equal(a.images, b.images)
        np.testing.assert_array_equal(a.action, b.action)
