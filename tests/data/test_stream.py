"""Streams: exactly-once per epoch across ranks x workers, bad samples, mixing, and the DataLoader."""

import io
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from tests.data.toy_shards import corrupt_first_image, write_robot, write_vl
from vla_scale.config.schema import DataConfig, SourceConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.loader import MixedBatches, StreamSpec, StreamTracker, batch_sources, build_dataloader
from vla_scale.data.reader import BadSamples, DataError, Reader, epoch_assignment
from vla_scale.data.stream import SourceStream


def stream(folder, reader, window=1, chunk=1, buffer=1, policy="skip", seed=0):
    return SourceStream(folder, reader, seed, buffer, True, window, chunk, BadSamples(policy))


def one_epoch_episode_keys(folder, world, workers, window):
    """Episode keys each reader yields in epoch 0 (window = episode length → one item per episode)."""
    seen = {}
    for rank, worker in itertools.product(range(world), range(workers)):
        s = stream(folder, Reader(rank, world, worker, workers), window=window)
        seen[(rank, worker)] = [w.key.split("/")[0] for w in s._epoch_items()]
    return seen


@pytest.mark.parametrize(
    "episodes, per_shard, world, workers",
    [(12, 3, 2, 2), (10, 3, 2, 1), (11, 2, 2, 2), (7, 2, 2, 2), (5, 5, 2, 2), (3, 1, 2, 2)],
    ids=["even", "uneven", "uneven-2x2", "odd-shards", "one-shard-4-readers", "fewer-samples-per-reader"],
)
def test_each_episode_read_exactly_once_per_epoch(tmp_path, episodes, per_shard, world, workers):
    write_robot(tmp_path, [4] * episodes, per_shard)
    seen = one_epoch_episode_keys(tmp_path, world, workers, window=4)
    everything = [k for keys in seen.values() for k in keys]
    assert Counter(everything) == Counter(f"ep{i:04d}" for i in range(episodes))
    if episodes >= world * workers:
        assert all(seen.values()), "no reader may be left without samples"


def test_shard_order_changes_between_epochs_but_split_stays_complete():
    shards = [f"s{i}" for i in range(6)]
    readers = [Reader(r, 2, w, 1) for r in range(2) for w in range(1)]
    e0 = [epoch_assignment(shards, 0, 0, r, True)[0] for r in readers]
    e1 = [epoch_assignment(shards, 1, 0, r, True)[0] for r in readers]
    assert sorted(sum(e0, [])) == sorted(shards) == sorted(sum(e1, []))
    assert e0 != e1


def test_uneven_readers_never_run_dry(tmp_path):
    """Infinite streams: a reader with a smaller share starts its next epoch instead of stopping."""
    write_robot(tmp_path, [3] * 5, per_shard=2)  # 3 shards over 2 readers: 4 vs 1 episodes
    small = iter(stream(tmp_path, Reader(1, 2, 0, 1)))
    items = [next(small) for _ in range(40)]
    assert len(items) == 40


def test_windows_carry_normalised_actions_and_masks(tmp_path):
    write_robot(tmp_path, [6, 6], per_shard=1)
    s = stream(tmp_path, Reader(), window=2, chunk=3)
    windows = list(s._epoch_items())
    assert len(windows) == 2 * 5
    w = windows[-1]
    assert w.images.dtype == np.uint8 and w.images.shape == (2, 16, 16, 3)
    assert w.action.shape == (2, 3, 4) and w.action_mask[-1].tolist() == [True, False, False]
    assert set(np.unique(w.action[..., -1])) <= {0.0, 1.0}
    assert abs(float(np.concatenate([x.action[:, 0, 0] for x in windows]).mean())) < 1.0


def test_bad_sample_skipped_counted_and_named(tmp_path, caplog):
    write_robot(tmp_path, [3] * 4, per_shard=2)
    victim = corrupt_first_image(tmp_path / "shard-000000.tar")
    s = stream(tmp_path, Reader(), window=3)
    keys = [w.key.split("/")[0] for w in s._epoch_items()]
    assert len(keys) == 3 and victim.split(".")[0] not in keys
    assert s.bad.counts["toy_robot"] == 1
    assert "shard-000000.tar" in caplog.text and victim.split(".")[0] in caplog.text


def test_bad_sample_fail_policy_raises_with_location(tmp_path):
    write_robot(tmp_path, [3] * 2, per_shard=2)
    corrupt_first_image(tmp_path / "shard-000000.tar")
    s = stream(tmp_path, Reader(), window=3, policy="fail")
    with pytest.raises(DataError, match=r"shard-000000\.tar:ep0000.*undecodable image.*bad_sample_policy=skip"):
        list(s._epoch_items())


def test_truncated_shard_is_reported_not_fatal(tmp_path):
    write_robot(tmp_path, [3] * 4, per_shard=2)
    path = tmp_path / "shard-000001.tar"
    path.write_bytes(path.read_bytes()[:700])
    s = stream(tmp_path, Reader(), window=3)
    keys = {w.key.split("/")[0] for w in s._epoch_items()}
    assert {"ep0000", "ep0001"} <= keys and s.bad.counts["toy_robot"] >= 1


def test_batch_sources_mix_per_sample_within_one_kind_and_match_weights():
    weights = np.array([0.5, 0.2, 0.3])
    kinds = ["robot", "robot", "vl"]
    batches = [batch_sources(5, i, weights, kinds, 8) for i in range(3000)]
    assert all(len({kinds[s] for s in b}) == 1 for b in batches), "a batch must be all robot or all VL"
    assert any(set(b) == {0, 1} for b in batches), "robot batches mix the two robot datasets per sample"
    counts = Counter(s for b in batches for s in b)
    for i, w in enumerate(weights):
        assert abs(counts[i] / (8 * 3000) - w) < 0.02
    assert batches == [batch_sources(5, i, weights, kinds, 8) for i in range(3000)]


def test_mixed_loader_with_workers_yields_typed_batches(tmp_path, tokenizer):
    robot = write_robot(tmp_path / "robot", [5] * 8, per_shard=2)
    vl = write_vl(tmp_path / "vl", 8, per_shard=4)
    cfg = DataConfig(
        sources=[SourceConfig(str(robot), 0.5), SourceConfig(str(vl), 0.5)],
        window_size=2,
        fwd_pred_next_n=2,
        num_workers=2,
        shuffle_buffer=4,
        max_text_len=16,
    )
    loader = build_dataloader(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=3), tokenizer)
    batches: list[Batch] = list(itertools.islice(iter(loader), 12))
    sources = [b.data_source for b in batches]
    assert set(sources) == {"robot", "vl"}
    expected = [batch_sources(0, i, np.array([0.5, 0.5]), ["robot", "vl"], 3)[0] for i in range(12)]
    assert sources == ["robot" if e == 0 else "vl" for e in expected], "batch order must follow the global schedule"
    tracker = StreamTracker(0, 1, 2, 3, None)
    for b in batches:
        tracker.update(b)
    assert set(tracker.mix()) == {"toy_robot", "toy_vl"} and abs(sum(tracker.mix().values()) - 1) < 1e-9
    robot_b = next(b for b in batches if b.data_source == "robot")
    assert robot_b.images.shape == (3, 2, 3, 16, 16) and robot_b.images.dtype == torch.uint8
    assert robot_b.action.shape == (3, 2, 2, 4) and robot_b.action_mask.shape == (3, 2, 2)
    assert robot_b.state.shape == (3, 2, 4) and robot_b.text_ids.shape[0] == 3
    assert (robot_b.text_labels == IGNORE_INDEX).all() and robot_b.text_mask.any(1).all()
    vl_b = next(b for b in batches if b.data_source == "vl")
    assert vl_b.images.shape == (3, 1, 3, 16, 16) and vl_b.action is None
    supervised = vl_b.text_labels != IGNORE_INDEX
    assert supervised.any(1).all() and (~supervised).any(1).all()
    eos = tokenizer.eos_token_id
    assert all(eos in vl_b.text_labels[i].tolist() for i in range(3))
    assert {b.meta["worker"] for b in batches} == {0, 1}


def test_missing_manifest_is_a_clear_error(tmp_path, tokenizer):
    cfg = DataConfig(sources=[SourceConfig(str(tmp_path / "nope"), 1.0)])
    with pytest.raises(ValueError, match="not a vla_scale dataset"):
        MixedBatches(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=2), tokenizer)


def _rewrite_sample(shard, key, change):
    """Rewrite `shard` with sample `key` altered by `change(dict) -> dict` (bypassing the writer's checks)."""
    import webdataset as wds

    samples = list(wds.tariterators.tarfile_samples(iter([{"url": str(shard)}])))
    with open(shard, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for s in samples:
            s = {k: v for k, v in s.items() if k != "__url__"}
            writer.write(change(s) if s["__key__"] == key else s)
        writer.close()


def _npy(arr):
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.parametrize(
    "fault, reason",
    [
        ("nan_action", "NaN or infinite"),
        ("missing_action", "missing action.npy"),
        ("wrong_shape", "length"),
        ("bad_json", "meta.json is not JSON"),
        ("meta_list", "meta.json is a JSON list, not an object"),
    ],
)
def test_corrupt_sample_kinds_are_skipped_and_counted_or_fatal(tmp_path, fault, reason, caplog):
    write_robot(tmp_path, [3] * 4, per_shard=2)

    def change(s):
        if fault == "nan_action":
            s["action.npy"] = _npy(np.full((3, 4), np.nan, np.float32))
        elif fault == "missing_action":
            del s["action.npy"]
        elif fault == "wrong_shape":
            s["state.npy"] = _npy(np.zeros((2, 4), np.float32))
        elif fault == "meta_list":
            s["meta.json"] = b'["instruction", 3]'
        else:
            s["meta.json"] = b"{not json"
        return s

    _rewrite_sample(tmp_path / "shard-000001.tar", "ep0002", change)
    s = stream(tmp_path, Reader(), window=3)
    keys = [w.key.split("/")[0] for w in s._epoch_items()]
    assert keys == ["ep0000", "ep0001", "ep0003"] and s.bad.counts["toy_robot"] == 1
    assert "ep0002" in caplog.text and reason in caplog.text
    with pytest.raises(DataError, match=reason):
        list(stream(tmp_path, Reader(), window=3, policy="fail")._epoch_items())


def test_empty_shard_is_reported(tmp_path, caplog):
    import webdataset as wds

    write_robot(tmp_path, [3] * 4, per_shard=2)
    with open(tmp_path / "shard-000000.tar", "wb") as f:
        wds.TarWriter(f, encoder=False).close()
    s = stream(tmp_path, Reader(), window=3)
    assert [w.key.split("/")[0] for w in s._epoch_items()] == ["ep0002", "ep0003"]
    assert s.bad.counts["toy_robot"] == 1 and "holds no samples" in caplog.text


def test_vl_images_of_different_sizes_collate_to_one_batch(tokenizer):
    from vla_scale.data.collate import collate_vl
    from vla_scale.data.format import VLSample

    conv = [{"from": "human", "value": "<image>\nwhat is it?"}, {"from": "gpt", "value": "a block"}]
    small = VLSample("a", np.full((10, 12, 3), 50, np.uint8), conv)
    large = VLSample("b", np.full((16, 20, 3), 200, np.uint8), conv)
    batch = collate_vl([small, large], tokenizer, 16)
    assert batch.images.shape == (2, 1, 3, 16, 20)
    assert (batch.images[1] == 200).all() and (batch.images[0] == 50).all()  # the largest passes through untouched


def test_episode_without_the_static_camera_is_skipped_and_named(tmp_path, caplog):
    import json

    write_robot(tmp_path, [3] * 2, per_shard=2)

    def rename_camera(s):
        meta = json.loads(s["meta.json"])
        meta["cameras"] = ["rgb_front"]
        s["meta.json"] = json.dumps(meta).encode()
        return s

    _rewrite_sample(tmp_path / "shard-000000.tar", "ep0001", rename_camera)
    s = stream(tmp_path, Reader(), window=3)
    assert [w.key for w in s._epoch_items()] == ["ep0000/0"]
    assert s.bad.counts["toy_robot"] == 1 and "no camera 'rgb_static'" in caplog.text


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b'{"conversations": "what is it?"}', "'conversations' must be a list of"),
        (b'{"conversations": ["what is it?"]}', "'conversations' must be a list of"),
        (b'[{"from": "human", "value": "hi"}]', "json has no 'conversations' list"),
    ],
)
def test_vl_conversation_that_is_not_a_list_of_turns_is_skipped_and_counted_or_fatal(tmp_path, payload, reason, caplog):
    write_vl(tmp_path, 4, per_shard=2)
    _rewrite_sample(tmp_path / "shard-000001.tar", "vl0002", lambda s: {**s, "json": payload})
    s = stream(tmp_path, Reader())
    assert sorted(v.key for v in s._epoch_items()) == ["vl0000", "vl0001", "vl0003"]
    assert s.bad.counts["toy_vl"] == 1 and "vl0002" in caplog.text and reason in caplog.text
    with pytest.raises(DataError, match=reason):
        list(stream(tmp_path, Reader(), policy="fail")._epoch_items())
