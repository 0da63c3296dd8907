"""Shard-level faults training must not miss: a source with nothing valid, cut shards, repeated keys, wrong shapes."""

import io
import itertools
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.data.toy_shards import write_robot
from vla_scale.config.schema import DataConfig, SourceConfig
from vla_scale.data.format import encode_npy
from vla_scale.data.loader import MixedBatches, StreamSpec
from vla_scale.data.reader import BadSamples, DataError, Reader
from vla_scale.data.stream import SourceStream


def stream(folder, reader=None, window=3, policy="skip"):
    return SourceStream(folder, reader or Reader(), 0, 1, True, window, 1, BadSamples(policy))


def episode_keys(s: SourceStream) -> list[str]:
    return sorted({w.key.split("/")[0] for w in s._epoch_items()})


def rewrite_shard(shard: Path, change) -> None:
    """Rewrite a shard's members through `change(list of (TarInfo, bytes)) -> list`, as a complete tar."""
    with tarfile.open(shard) as tar:
        members = [(info, tar.extractfile(info).read()) for info in tar.getmembers()]
    with tarfile.open(shard, "w", format=tarfile.USTAR_FORMAT) as tar:
        for info, data in change(members):
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def replace_member(shard: Path, name: str, data: bytes) -> None:
    rewrite_shard(shard, lambda members: [(i, data if i.name == name else d) for i, d in members])


def png(size: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(buf, format="png")
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_source_with_no_decodable_image_stops_the_loader_with_a_message(tmp_path, tokenizer):
    """Before: every window was skipped and the stream looped over its epochs forever."""
    robot = write_robot(tmp_path / "robot", [3] * 4, per_shard=2)
    for shard in sorted(robot.glob("shard-*.tar")):
        rewrite_shard(shard, lambda ms: [(i, b"garbage" if i.name.endswith(".png") else d) for i, d in ms])
    cfg = DataConfig(sources=[SourceConfig(str(robot), 1.0)], num_workers=0, max_bad_in_a_row=50)
    batches = MixedBatches(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=2), tokenizer)
    with pytest.raises(DataError, match=r"source 'toy_robot' .*no valid sample in 50 attempts.*50 samples skipped"):
        next(iter(batches))


def test_max_bad_in_a_row_lets_a_partly_bad_source_train(tmp_path, tokenizer):
    """The bound counts bad samples in a row only: a valid one in between resets it."""
    robot = write_robot(tmp_path / "robot", [3] * 4, per_shard=2)
    replace_member(robot / "shard-000000.tar", "ep0000.rgb_static.0000.png", b"garbage")
    cfg = DataConfig(sources=[SourceConfig(str(robot), 1.0)], num_workers=0, max_bad_in_a_row=2, shuffle_buffer=1)
    batches = MixedBatches(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=2), tokenizer)
    assert len(list(itertools.islice(iter(batches), 20))) == 20


@pytest.mark.parametrize("where", ["mid-member", "at-a-sample-boundary", "before-the-end-blocks"])
def test_truncated_shard_counts_the_samples_it_lost_with_shard_and_key(tmp_path, caplog, where):
    """Before: a cut at a member boundary dropped the shard's tail without a count, a cut inside one half-read it."""
    write_robot(tmp_path, [3] * 4, per_shard=2)
    shard = tmp_path / "shard-000001.tar"
    with tarfile.open(shard) as tar:
        members = {m.name: m for m in tar.getmembers()}
    cut = {
        "mid-member": members["ep0002.rgb_static.0001.png"].offset_data + 10,
        "at-a-sample-boundary": members["ep0003.action.npy"].offset,
        "before-the-end-blocks": members["ep0003.state.npy"].offset_data + 512,
    }[where]
    shard.write_bytes(shard.read_bytes()[:cut])
    s = stream(tmp_path)
    keys = episode_keys(s)
    if where == "before-the-end-blocks":  # the last sample cannot be told complete: counted, never half-read
        assert keys == ["ep0000", "ep0001", "ep0002"] and s.bad.counts["toy_robot"] == 1
        assert "shard-000001.tar:ep0003" in caplog.text and "end-of-archive" in caplog.text
    else:
        assert keys == ["ep0000", "ep0001"] and s.bad.counts["toy_robot"] == 2
        assert "shard-000001.tar:ep0002" in caplog.text and "shard truncated inside this sample" in caplog.text
        assert "1 more listed in manifest.json" in caplog.text


def test_truncated_shard_counted_once_over_readers_sharing_it(tmp_path):
    """With fewer shards than readers every reader opens the shard; each lost sample is still counted once."""
    write_robot(tmp_path, [3] * 5, per_shard=5)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        cut = next(m for m in tar.getmembers() if m.name == "ep0002.meta.json").offset_data + 5
    shard.write_bytes(shard.read_bytes()[:cut])
    streams = [stream(tmp_path, Reader(0, 1, w, 2)) for w in range(2)]
    keys = sorted(k for s in streams for k in episode_keys(s))
    assert keys == ["ep0000", "ep0001"]
    assert sum(s.bad.counts["toy_robot"] for s in streams) == 3  # ep0002 cut, ep0003 and ep0004 lost


def test_truncated_shard_under_fail_policy_names_shard_and_key(tmp_path):
    write_robot(tmp_path, [3] * 4, per_shard=2)
    shard = tmp_path / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(DataError, match=r"shard-000000\.tar:ep0000.*truncated.*bad_sample_policy=skip"):
        list(stream(tmp_path, policy="fail")._epoch_items())


@pytest.mark.parametrize("adjacent", [True, False], ids=["adjacent", "apart"])
def test_duplicated_sample_in_a_shard_is_read_once_and_counted(tmp_path, caplog, adjacent):
    """Before: the repeated key was read (and trained on) twice without a word."""
    write_robot(tmp_path, [3] * 6, per_shard=3)

    def duplicate(members):
        first = [(i, d) for i, d in members if i.name.startswith("ep0000.")]
        copies = [(tarfile.TarInfo(i.name), d) for i, d in first]
        split = len(first) if adjacent else len(members)
        return members[:split] + copies + members[split:]

    rewrite_shard(tmp_path / "shard-000000.tar", duplicate)
    s = stream(tmp_path)
    items = [w.key.split("/")[0] for w in s._epoch_items()]
    assert items.count("ep0000") == 1 and sorted(set(items)) == [f"ep{i:04d}" for i in range(6)]
    assert s.bad.counts["toy_robot"] == 1
    assert "shard-000000.tar:ep0000" in caplog.text and "duplicate sample key 'ep0000'" in caplog.text


def test_state_of_another_dimension_is_a_bad_sample(tmp_path, caplog):
    """Before: a 5-dim state in a 4-dim dataset trained silently."""
    write_robot(tmp_path, [3] * 4, per_shard=2)
    replace_member(tmp_path / "shard-000001.tar", "ep0003.state.npy", encode_npy(np.zeros((3, 5), np.float32)))
    s = stream(tmp_path)
    assert episode_keys(s) == ["ep0000", "ep0001", "ep0002"] and s.bad.counts["toy_robot"] == 1
    assert "shard-000001.tar:ep0003" in caplog.text and "state has 5 dimensions, manifest.json says 4" in caplog.text
    with pytest.raises(DataError, match=r"ep0003.*state has 5 dimensions"):
        list(stream(tmp_path, policy="fail")._epoch_items())


def test_frames_of_another_size_are_a_bad_sample(tmp_path, caplog):
    """Before: 8x8 frames in a 16x16 dataset trained silently."""
    write_robot(tmp_path, [3] * 4, per_shard=2)
    replace_member(tmp_path / "shard-000000.tar", "ep0001.rgb_static.0001.png", png(8))
    s = stream(tmp_path, window=1)
    items = [w.key for w in s._epoch_items()]
    assert len(items) == 11 and "ep0001/1" not in items and s.bad.counts["toy_robot"] == 1
    assert "shard-000000.tar:ep0001" in caplog.text
    assert "rgb_static frames are [8, 8] (H, W), manifest.json image_size is [16, 16]" in caplog.text
