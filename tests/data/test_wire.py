"""Batches from a DataLoader worker (small arrays sent by value, frames of big batches in shared memory) equal
the batches the rank makes itself."""

import itertools

import numpy as np
import pytest
import torch

from tests.data.toy_shards import write_robot
from vla_scale.config.schema import DataConfig, SourceConfig
from vla_scale.data import wire
from vla_scale.data.batch import Batch
from vla_scale.data.loader import StreamSpec, build_dataloader


@pytest.mark.timeout(120)
def test_worker_batches_arrive_as_tensors_equal_to_in_process_ones(tmp_path, tokenizer, monkeypatch):
    write_robot(tmp_path, [6, 7, 5], per_shard=1)
    # 16x16 frames: 3 KiB a batch; lower the bar so the frames take the shared-memory path and the rest not
    monkeypatch.setattr(wire, "SHARED_MIN_BYTES", 2048)

    def batches(workers: int) -> list[Batch]:
        cfg = DataConfig(sources=[SourceConfig(path=str(tmp_path))], num_workers=workers, window_size=2)
        loader = build_dataloader(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=2), tokenizer)
        return list(itertools.islice(loader, 6))

    inside, worker = batches(0), batches(1)  # one worker reads what the rank alone reads
    assert [b.meta["keys"] for b in worker] == [b.meta["keys"] for b in inside]
    for a, b in zip(inside, worker, strict=True):
        for name in ("images", "text_ids", "text_mask", "text_labels", "state", "action", "action_mask"):
            got = getattr(b, name)
            assert isinstance(got, torch.Tensor), name
            assert got.dtype == getattr(a, name).dtype, name
            np.testing.assert_array_equal(got.numpy(), getattr(a, name).numpy())
