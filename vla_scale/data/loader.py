"""The training DataLoader: per-source streams mixed by weight, collated in worker processes.

Each batch comes from one source, chosen with an RNG seeded only by the run seed and
the global batch index, so every rank takes the same path (robot or VL) at the same
step and the ZeRO collectives line up; over a run the share of each source matches
its configured weight.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vla_scale.config.schema import DataConfig
from vla_scale.data.batch import Batch
from vla_scale.data.collate import collate_robot, collate_vl
from vla_scale.data.format import Manifest
from vla_scale.data.stream import BadSamples, Reader, SourceStream


def source_schedule(seed: int, batch_index: int, weights: np.ndarray) -> int:
    """Index of the source that global batch `batch_index` draws from (same on every rank)."""
    return int(np.random.default_rng([seed, batch_index, 104729]).choice(len(weights), p=weights))


class MixedBatches(IterableDataset):
    """An infinite iterable of `Batch`es for one rank; shard reading happens in its workers."""

    def __init__(self, cfg: DataConfig, seed: int, rank: int, world_size: int, tokenizer: Any, micro_batch_size: int):
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.tokenizer = tokenizer
        self.micro_batch_size = micro_batch_size
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.manifests = [Manifest.load(s.path) for s in cfg.sources]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        reader = Reader(self.rank, self.world_size, worker, num_workers)
        bad = BadSamples(self.cfg.bad_sample_policy)
        streams = [
            iter(
                SourceStream(
                    src.path,
                    reader,
                    seed=self.seed + i,
                    shuffle_buffer=self.cfg.shuffle_buffer,
                    shard_shuffle=self.cfg.shard_shuffle,
                    window_size=self.cfg.window_size,
                    chunk=self.cfg.fwd_pred_next_n,
                    bad=bad,
                )
            )
            if self.weights[i] > 0
            else None
            for i, src in enumerate(self.cfg.sources)
        ]
        k = 0
        while True:
            batch_index = k * num_workers + worker
            src = source_schedule(self.seed, batch_index, self.weights)
            stream = streams[src]
            assert stream is not None  # weight-0 sources are never scheduled
            items = [next(stream) for _ in range(self.micro_batch_size)]
            if self.manifests[src].kind == "robot":
                batch = collate_robot(items, self.tokenizer, self.cfg.max_text_len)
            else:
                batch = collate_vl(items, self.tokenizer, self.cfg.max_text_len)
            batch.meta = {
                "source": self.manifests[src].name,
                "worker": worker,
                "batch_index": batch_index,
                "skipped": dict(bad.counts),
            }
            yield batch
            k += 1


def _identity(batch: Batch) -> Batch:
    return batch


def build_dataloader(
    cfg: DataConfig, seed: int, rank: int, world_size: int, tokenizer: Any, micro_batch_size: int
) -> DataLoader:
    """DataLoader over `MixedBatches`; batches arrive fully collated (batch_size=None)."""
    dataset = MixedBatches(cfg, seed, rank, world_size, tokenizer, micro_batch_size)
    workers = cfg.num_workers
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=_identity,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


class SkipTracker:
    """Sums the per-worker cumulative skip counts that batches carry in `meta`."""

    def __init__(self) -> None:
        self._latest: dict[int, dict[str, int]] = {}

    def update(self, batch: Batch) -> None:
        if "worker" in batch.meta:
            self._latest[batch.meta["worker"]] = batch.meta.get("skipped", {})

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for counts in self._latest.values():
            for name, n in counts.items():
                out[name] = out.get(name, 0) + n
        return out
