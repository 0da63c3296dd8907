"""Exact mid-epoch resume of a stream read over HTTP: the batches equal the local copy's uninterrupted stream."""

import dataclasses

import pytest

from tests.data.remote_servers import http_server
from tests.data.test_resume import MICRO, assert_same, data_cfg, spec, take
from vla_scale.config.schema import AugmentConfig, SourceConfig
from vla_scale.config.schema_data import StorageConfig
from vla_scale.data.loader import StreamTracker, build_dataloader


@pytest.mark.parametrize("workers, stop", [(2, 7), (0, 5)], ids=["2w", "in-process"])
def test_remote_stream_resumes_exactly_where_the_local_one_would_be(tmp_path, tokenizer, workers, stop):
    # no augmentation: its per-window draw is keyed by the shard's path, which differs between the two copies
    local = dataclasses.replace(data_cfg(tmp_path, workers), augment=AugmentConfig(enabled=False))
    full = take(build_dataloader(local, spec(), tokenizer), stop + 6)
    with http_server(tmp_path) as (base, faults):
        storage = StorageConfig(cache_dir=str(tmp_path / "cache"), read_ahead=1, backoff_s=0.01)
        sources = [SourceConfig(f"{base}/{s.path.rsplit('/', 1)[-1]}", s.weight) for s in local.sources]
        remote = dataclasses.replace(local, sources=sources, storage=storage)
        faults.errors["shard-000002.tar"] = 1  # one transient failure on the way, retried
        tracker = StreamTracker(3, 1, workers, MICRO, None)
        first = take(build_dataloader(remote, spec(), tokenizer), stop, tracker)
        state = tracker.state_dict()
        resumed = take(build_dataloader(remote, spec(), tokenizer, resume=state), 6)
    for a, b in zip(full, first + resumed, strict=True):
        assert_same(a, b)
    assert faults.errors["shard-000002.tar"] == 0
