"""Per-source sample streams: shards → (split by rank and worker) → decoded items.

Each DataLoader worker of each rank is one *reader*; there are
`world_size × num_workers` readers. In every epoch the shard list is shuffled with
a seed shared by all readers and then dealt out, so each sample is read by exactly
one reader per epoch. With fewer shards than readers every reader opens every shard
and keeps every `num_readers`-th sample instead, so no reader is ever empty.

Streams are infinite (epoch after epoch) and training is measured in steps, so a
reader whose share is smaller simply starts its next epoch sooner: uneven shard
counts never leave one rank waiting at a collective for a batch that never comes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from vla_scale.data.format import FormatError, Manifest, decode_episode, decode_vl, load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.data.window import iter_windows

log = logging.getLogger(__name__)

WRIST_CAMERA = "rgb_wrist"


class DataError(RuntimeError):
    """A bad sample under `bad_sample_policy: fail`, or a dataset that cannot be read at all."""


@dataclass(frozen=True)
class Reader:
    """Which slice of the data this process/worker reads."""

    rank: int = 0
    world_size: int = 1
    worker: int = 0
    num_workers: int = 1

    @property
    def index(self) -> int:
        return self.rank * self.num_workers + self.worker

    @property
    def count(self) -> int:
        return self.world_size * self.num_workers


def epoch_assignment(
    shards: list[str], epoch: int, seed: int, reader: Reader, shuffle: bool
) -> tuple[list[str], int | None]:
    """Shards this reader opens in `epoch`, and the sample stride index when shards < readers.

    Returns `(shards, None)` for shard-level splitting, `(all_shards, reader.index)`
    for sample-level splitting (keep samples whose position % count == index).
    """
    order = list(shards)
    if shuffle:
        order = [order[i] for i in np.random.default_rng([seed, epoch]).permutation(len(order))]
    if len(order) >= reader.count:
        return order[reader.index :: reader.count], None
    return order, reader.index


@dataclass
class BadSamples:
    """Counts (and logs) samples skipped under the bad-sample policy, by reason."""

    policy: str = "skip"
    counts: Counter = field(default_factory=Counter)

    def report(self, source: str, where: str, err: Exception) -> None:
        reason = type(err).__name__
        message = f"bad sample in source {source!r} at {where}: {err}"
        if self.policy == "fail":
            raise DataError(message + " (set data.bad_sample_policy=skip to count and skip such samples)") from err
        self.counts[source] += 1
        log.warning("skipped %s [%s]", message, reason)


def iter_raw_samples(
    paths: list[str], stride: int | None, count: int, on_error: Callable[[str, Exception], None]
) -> Iterator[dict]:
    """Raw webdataset samples (bytes per member) from `paths`, optionally every `count`-th one."""
    position = 0
    for path in paths:

        def handler(exn: Exception, path: str = path) -> bool:
            on_error(path, exn)
            return True

        for sample in wds.tariterators.tarfile_samples(iter([{"url": path}]), handler=handler):
            keep = stride is None or position % count == stride
            position += 1
            if keep:
                yield sample


class SourceStream:
    """An infinite, shuffled stream of items (robot windows or VL samples) from one dataset for one reader."""

    def __init__(
        self,
        folder: str | Path,
        reader: Reader,
        seed: int,
        shuffle_buffer: int,
        shard_shuffle: bool,
        window_size: int,
        chunk: int,
        bad: BadSamples,
    ):
        self.folder = Path(folder)
        self.manifest = Manifest.load(self.folder)
        if not self.manifest.shards:
            raise DataError(f"{self.folder}/manifest.json lists no shards")
        self.name = self.manifest.name
        self.kind = self.manifest.kind
        self.reader = reader
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.shard_shuffle = shard_shuffle
        self.window_size = window_size
        self.chunk = chunk
        self.bad = bad
        self.normalizer = Normalizer(load_stats(self.folder)) if self.kind == "robot" else None
        self.static_camera = self._static_camera()
        self.epoch = 0
        self.rng = np.random.default_rng([seed, reader.rank, reader.worker, 7919])

    def _static_camera(self) -> str | None:
        if self.kind != "robot":
            return None
        cams = [c for c in self.manifest.cameras if c != WRIST_CAMERA]
        if not cams:
            raise DataError(f"{self.folder}: manifest lists no static camera (cameras={self.manifest.cameras})")
        return cams[0]

    def _items_of(self, sample: dict) -> list[Any]:
        if self.kind == "vl":
            return [decode_vl(sample)]
        ep = decode_episode(sample)
        assert self.normalizer is not None and self.static_camera is not None
        ep.action = self.normalizer.normalize_action(ep.action)
        ep.state = self.normalizer.normalize_state(ep.state)
        return list(iter_windows(ep, self.window_size, self.chunk, self.static_camera, WRIST_CAMERA))

    def _epoch_items(self) -> Iterator[Any]:
        paths, stride = epoch_assignment(
            [str(self.folder / s.path) for s in self.manifest.shards],
            self.epoch,
            self.seed,
            self.reader,
            self.shard_shuffle,
        )

        def on_error(path: str, exn: Exception) -> None:
            self.bad.report(self.name, path, exn)

        for sample in iter_raw_samples(paths, stride, self.reader.count, on_error):
            try:
                yield from self._items_of(sample)
            except (FormatError, KeyError, ValueError) as err:
                self.bad.report(self.name, f"{sample.get('__url__')}:{sample.get('__key__')}", err)

    def __iter__(self) -> Iterator[Any]:
        buffer: list[Any] = []
        while True:
            produced = 0
            for item in self._epoch_items():
                produced += 1
                if len(buffer) < self.shuffle_buffer:
                    buffer.append(item)
                    continue
                idx = int(self.rng.integers(len(buffer)))
                buffer[idx], item = item, buffer[idx]
                yield item
            if produced == 0:
                raise DataError(
                    f"source {self.name!r} ({self.folder}) produced no usable samples in epoch {self.epoch} "
                    f"for reader {self.reader.index}/{self.reader.count}; check the bad-sample log, the "
                    "window size against the episode lengths, and that the dataset has at least as many "
                    "samples as ranks x workers"
                )
            self.epoch += 1
