"""A bad sample only rank 1 reads counts in `skipped_samples` (rank 0 writes the metrics)."""

import shutil
import tarfile
from pathlib import Path

import pytest

from tests.data.test_shard_faults import replace_member
from tests.train.jobs import CONFIG, run_ranks
from vla_scale.config.load import load_config
from vla_scale.data.format import Manifest
from vla_scale.data.reader import Reader, epoch_assignment
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_bad_sample_read_by_rank_1_counts_in_skipped_samples(tmp_path: Path, toy_data: Path) -> None:
    """Before: each rank kept its own count and rank 0 logged only its own, so this run reported 0."""
    data = tmp_path / "data"
    shutil.copytree(toy_data / "robot", data / "robot")
    (data / "vl").symlink_to(toy_data / "vl", target_is_directory=True)
    cfg = load_config(CONFIG)
    manifest = Manifest.load(data / "robot")
    shards = [s.path for s in manifest.shards]
    workers = cfg.data.num_workers
    rank0 = {p for w in range(workers) for p in epoch_assignment(shards, 0, 0, Reader(0, 2, w, workers), True)[0]}
    first = epoch_assignment(shards, 0, 0, Reader(1, 2, 0, workers), True)[0][0]  # rank 1 reads it first
    assert cfg.run.seed == 0 and cfg.data.shard_shuffle and first not in rank0
    with tarfile.open(data / "robot" / first) as tar:
        key = next(m.name for m in tar.getmembers() if m.name.endswith(".meta.json"))
    replace_member(data / "robot" / first, key, b"{not json")

    result = run_ranks(tmp_path, data, "train.max_steps=2", "train.ckpt_every=0", "run.seed=0")
    records = read_metrics(result.run_dir)
    assert [r["step"] for r in records] == [1, 2]
    logs = {rank: (tmp_path / "rank_logs" / f"rank{rank}.log").read_text() for rank in range(2)}
    victim = f"{first}:{key.split('.')[0]}"
    assert victim in logs[1] and "meta.json is not JSON" in logs[1] and victim not in logs[0]
    assert records[-1]["skipped_samples"] == 1, records[-1]
