"""One 2-rank training job whose datasets live in a (loopback moto) S3 bucket: stopped, resumed, exactly-once.

The session's reference run (tests/train/conftest.py) trains configs/debug.yaml on the same data from local
disk at a constant learning rate, so every step of the S3 run, before and after its resume, must log the
same losses: the same samples in the same order on every rank.
"""

import pytest

from data_tools.upload import upload
from tests.data.remote_servers import BUCKET, s3_server
from tests.train.jobs import run_ranks
from tests.train.nodes import LOSS_TERMS as LOSSES
from vla_scale.cli import main as cli_main
from vla_scale.data.format import load_stats
from vla_scale.data.shard_cache import ShardCache
from vla_scale.train.metrics import read_metrics

pytestmark = pytest.mark.integration


def test_two_ranks_train_from_s3_and_resume_exactly(tmp_path, toy_data, reference_run):
    straight = read_metrics(reference_run.run_dir)
    limit = 2_000_000
    cache = tmp_path / "cache"
    with s3_server():
        for name in ("robot", "vl"):
            upload(toy_data / name, f"s3://{BUCKET}/toy/{name}")
        common = (
            f"data.sources.0.path=s3://{BUCKET}/toy/robot",
            f"data.sources.1.path=s3://{BUCKET}/toy/vl",
            f"data.storage.cache_dir={cache}",
            f"data.storage.cache_limit_gb={limit / 1e9}",
            "data.storage.read_ahead=1",
            "train.ckpt_every=3",
            "wandb.mode=disabled",
        )
        run_ranks(tmp_path, toy_data, *common, "train.max_steps=3")
        job = run_ranks(tmp_path, toy_data, *common, "train.max_steps=6")
        assert cli_main(["export", str(job.run_dir), str(tmp_path / "policy")]) == 0  # stats.json from S3
    assert "resumed from" in job.logs
    records = read_metrics(job.run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(records, straight[:6], strict=True):
        for term in LOSSES:
            if term in b:
                assert a[term] == pytest.approx(b[term], rel=1e-6, abs=1e-7), (a["step"], term)
    assert 0 < ShardCache(cache, limit).used_bytes() <= limit
    exported, local = load_stats(tmp_path / "policy"), load_stats(toy_data / "robot")
    assert all((exported[k]["mean"] == local[k]["mean"]).all() for k in ("action", "state"))
