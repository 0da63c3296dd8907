"""Exact mid-epoch resume: batches after a resume equal those of an uninterrupted stream."""

import itertools

import pytest
import torch

from tests.data.toy_shards import corrupt_first_image, write_robot, write_vl
from vla_scale.config.schema import AugmentConfig, DataConfig, SourceConfig
from vla_scale.data.loader import StreamSpec, StreamTracker, build_dataloader
from vla_scale.data.reader import DataError

MICRO = 3


def spec(world_size: int = 1) -> StreamSpec:
    return StreamSpec(seed=3, rank=0, world_size=world_size, micro_batch_size=MICRO)


def data_cfg(tmp_path, workers: int) -> DataConfig:
    robot = tmp_path / "robot"
    if not robot.exists():
        write_robot(robot, [5, 6, 4, 7, 5, 6, 5], per_shard=2)
        corrupt_first_image(robot / "shard-000001.tar")  # ep0002 frame 0: windows starting at 0 are bad
        write_vl(tmp_path / "vl", 6, per_shard=2)
    return DataConfig(
        sources=[SourceConfig(str(robot), 0.7), SourceConfig(str(tmp_path / "vl"), 0.3)],
        window_size=2,
        fwd_pred_next_n=2,
        num_workers=workers,
        shuffle_buffer=5,
        max_text_len=16,
        augment=AugmentConfig(enabled=True, crop="resized_crop"),  # per-window RNG must survive the resume
    )


def take(loader, n, tracker=None):
    out = []
    for batch in itertools.islice(iter(loader), n):
        if tracker is not None:
            tracker.update(batch)
        out.append(batch)
    return out


def assert_same(a, b):
    assert a.data_source == b.data_source and a.meta["batch_index"] == b.meta["batch_index"]
    for name in ("images", "text_ids", "text_mask", "text_labels", "state", "action", "action_mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("workers, stop", [(2, 7), (2, 10), (0, 5)], ids=["2w-odd", "2w-even", "in-process"])
def test_resumed_stream_continues_exactly(tmp_path, tokenizer, workers, stop):
    cfg = data_cfg(tmp_path, workers)
    full = take(build_dataloader(cfg, spec(), tokenizer), stop + 6)

    tracker = StreamTracker(3, 1, workers, MICRO, None)
    take(build_dataloader(cfg, spec(), tokenizer), stop, tracker)  # the run that "dies" after `stop`
    state = tracker.state_dict()
    assert state["batches"] == stop
    assert sum(tracker.skipped().values()) > 0, "the corrupt frame must have been hit before the stop"

    resumed_tracker = StreamTracker(3, 1, workers, MICRO, state)
    resumed = take(build_dataloader(cfg, spec(), tokenizer, resume=state), 6, resumed_tracker)
    for a, b in zip(full[stop:], resumed, strict=True):
        assert_same(a, b)
    # skip counts continue from the checkpoint instead of restarting at zero
    full_tracker = StreamTracker(3, 1, workers, MICRO, None)
    for b in full:
        full_tracker.update(b)
    assert resumed_tracker.skipped() == full_tracker.skipped()


def test_resume_with_another_split_is_refused(tmp_path, tokenizer):
    cfg = data_cfg(tmp_path, 2)
    state = StreamTracker(3, 2, 2, MICRO, None).state_dict()
    with pytest.raises(DataError, match=r"world_size: checkpoint 2 vs now 1.*same ranks, workers"):
        build_dataloader(cfg, spec(), tokenizer, resume=state)
    with pytest.raises(DataError, match=r"num_workers: checkpoint 2 vs now 1"):
        build_dataloader(data_cfg(tmp_path, 1), spec(world_size=2), tokenizer, resume=state)
