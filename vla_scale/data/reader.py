"""What one reader of a source stream is: its place among ranks x workers, its shard share of an epoch, the
bad-sample policy it reports to, and the error a run stops with for bad data.

Why apart from stream.py: the elastic stream (elastic.py) and the loader deal out the same readers and refuse a
resume the same way, without needing the per-source decoding.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """A bad sample under `bad_sample_policy: fail`, or a dataset that cannot be read at all."""


def state_mismatch(state: dict, now: dict) -> str:
    """The keys of `now` whose value differs in a checkpoint's data `state`, as "key: checkpoint X vs now Y, ..."
    ("" when all match): what a resume refusal names."""
    return ", ".join(f"{k}: checkpoint {state.get(k)} vs now {v}" for k, v in now.items() if state.get(k) != v)


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

    def report(self, source: str, where: str, err: Exception | None, n: int = 1) -> None:
        """Count `n` bad samples; log them (or raise under `fail`). `err=None`: a replayed, already-logged one."""
        if err is None:
            self.counts[source] += n
            return
        reason = type(err).__name__
        message = f"bad sample in source {source!r} at {where}: {err}"
        if self.policy == "fail":
            raise DataError(message + " (set data.bad_sample_policy=skip to count and skip such samples)") from err
        self.counts[source] += n
        log.warning("skipped %s [%s]", message, reason)
