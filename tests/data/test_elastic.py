"""`data.elastic`: the content of optimizer step g is a function of (seed, g) alone, so a stream saved on N ranks
resumes on M ranks with nothing repeated or skipped (mixing, augmentation and bad-window skips included)."""

import itertools
from collections import Counter

import pytest

from tests.data.test_resume import assert_same
from tests.data.toy_shards import corrupt_first_image, write_robot, write_vl
from vla_scale.config.schema import AugmentConfig, DataConfig, SourceConfig
from vla_scale.data.elastic import loader_workers, rank_virtual_readers
from vla_scale.data.loader import StreamSpec, StreamTracker, build_dataloader
from vla_scale.data.reader import DataError

MICRO, GLOBAL, SEED = 3, 12, 3  # 4 micro-batches per optimizer step: 1, 2 or 4 ranks


def data_cfg(tmp_path, elastic=True, workers=2, vl=True, buffer=5) -> DataConfig:
    robot = tmp_path / "robot"
    if not robot.exists():
        write_robot(robot, [5, 6, 4, 7, 5, 6, 5, 6, 4, 5], per_shard=2)
        corrupt_first_image(robot / "shard-000001.tar")  # windows starting at frame 0 of ep0002 are bad
        write_vl(tmp_path / "vl", 6, per_shard=2)
    sources = [SourceConfig(str(robot), 0.7)] + ([SourceConfig(str(tmp_path / "vl"), 0.3)] if vl else [])
    return DataConfig(
        sources=sources,
        window_size=2,
        fwd_pred_next_n=2,
        num_workers=workers,
        shuffle_buffer=buffer,
        max_text_len=16,
        augment=AugmentConfig(enabled=True, crop="resized_crop"),
        elastic=elastic,
    )


def run(cfg, tokenizer, world, steps, resume=None):
    """`steps` optimizer steps on `world` simulated ranks: {(step, virtual reader): batch} and the checkpoint's
    data state (rank 0's, with every rank's skip counts and bad windows, as `gathered_data_state` makes it)."""
    accum = GLOBAL // MICRO // world
    out, trackers = {}, []
    for rank in range(world):
        spec = StreamSpec(seed=SEED, rank=rank, world_size=world, micro_batch_size=MICRO, global_batch_size=GLOBAL)
        readers = rank_virtual_readers(GLOBAL // MICRO, world, rank)
        tracker = StreamTracker(SEED, world, cfg.num_workers, MICRO, resume, virtual_readers=4, readers=readers)
        for batch in itertools.islice(iter(build_dataloader(cfg, spec, tokenizer, resume)), steps * accum):
            tracker.update(batch)
            out[(batch.meta["global_step"], batch.meta["worker"])] = batch
        trackers.append(tracker.state_dict())
    state = dict(trackers[0], skipped={}, bad_windows={})
    for t in trackers:
        state["skipped"].update(t["skipped"])
        state["bad_windows"].update(t["bad_windows"])
    return out, state


def test_two_ranks_then_one_then_four_continue_the_uninterrupted_stream(tmp_path, tokenizer):
    cfg = data_cfg(tmp_path)
    straight, _ = run(cfg, tokenizer, world=2, steps=9)
    assert sorted(straight) == [(g, v) for g in range(9) for v in range(4)]
    first, state = run(cfg, tokenizer, world=2, steps=3)
    assert state["steps"] == 3 and state["elastic"]
    second, state = run(cfg, tokenizer, world=1, steps=3, resume=state)
    third, state = run(cfg, tokenizer, world=4, steps=3, resume=state)
    resumed = {**first, **second, **third}
    assert sorted(resumed) == sorted(straight)
    for key, batch in straight.items():
        assert_same(batch, resumed[key])
        assert batch.meta["keys"] == resumed[key].meta["keys"], key
    assert sum(sum(c.values()) for c in state["skipped"].values()) > 0, "the corrupt frame must have been hit"
    kinds = {g: {straight[(g, v)].data_source for v in range(4)} for g in range(9)}
    assert all(len(k) == 1 for k in kinds.values()), "every micro-batch of a step takes the same model path"
    assert {k for ks in kinds.values() for k in ks} == {"robot", "vl"}


def test_resume_refuses_another_mode_or_batch_split(tmp_path, tokenizer):
    _, elastic_state = run(data_cfg(tmp_path), tokenizer, world=2, steps=1)
    legacy_state = StreamTracker(SEED, 2, 2, MICRO, None).state_dict()
    spec = StreamSpec(seed=SEED, rank=0, world_size=1, micro_batch_size=MICRO, global_batch_size=GLOBAL)
    with pytest.raises(DataError, match="without data.elastic"):
        build_dataloader(data_cfg(tmp_path), spec, tokenizer, resume=legacy_state)
    with pytest.raises(DataError, match="virtual_readers: checkpoint 4 vs now 2"):
        build_dataloader(
            data_cfg(tmp_path), StreamSpec(**{**spec.__dict__, "global_batch_size": 6}), tokenizer, resume=elastic_state
        )
    with pytest.raises(DataError, match="divides"):
        rank_virtual_readers(4, 3, 0)
    assert [loader_workers(2, 4, w) for w in (1, 2, 4)] == [2, 2, 1]


def same_episode_rate(batches) -> float:
    """Share of sample pairs within one optimizer step that come from the same episode (lower = better mixed)."""
    pairs = same = 0
    for keys in batches:
        episodes = Counter(k.split("/")[0] for k in keys)
        n = sum(episodes.values())
        pairs += n * (n - 1) // 2
        same += sum(c * (c - 1) // 2 for c in episodes.values())
    return same / pairs


def test_shuffle_quality_is_comparable_to_the_per_rank_buffers(tmp_path, tokenizer):
    """Same shuffle buffer size, robot data only, 2 ranks x 1 worker: the share of same-episode pairs within an
    optimizer step (12 windows), over 12 steps. Figures go into README "Preemption and elastic resume"."""
    steps = 12
    elastic, _ = run(data_cfg(tmp_path, vl=False, workers=1), tokenizer, world=2, steps=steps)
    e_rate = same_episode_rate([k for v in range(4) for k in elastic[(g, v)].meta["keys"]] for g in range(steps))
    legacy = []  # legacy[rank][k]: that rank's k-th micro-batch; optimizer step g is micro-batches 2g, 2g+1 of each
    for rank in range(2):
        spec = StreamSpec(seed=SEED, rank=rank, world_size=2, micro_batch_size=MICRO)
        loader = build_dataloader(data_cfg(tmp_path, elastic=False, vl=False, workers=1), spec, tokenizer)
        legacy.append([b.meta["keys"] for b in itertools.islice(iter(loader), 2 * steps)])
    l_rate = same_episode_rate(
        [k for r in range(2) for m in (2 * g, 2 * g + 1) for k in legacy[r][m]] for g in range(steps)
    )
    print(f"same-episode pair share per optimizer step: elastic {e_rate:.3f}, per-rank buffers {l_rate:.3f}")
    assert e_rate <= 1.5 * l_rate + 0.02
