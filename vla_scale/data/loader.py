"""The training DataLoader: per-source streams mixed by weight, collated in worker processes.

Which datasets a batch draws from is a function of the run seed and the global batch
index only (`batch_sources`), so every rank takes the same path (robot or VL) at the
same step and the ZeRO collectives line up, and a resumed run can replay the schedule.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vla_scale.config.schema import DataConfig
from vla_scale.data.batch import Batch
from vla_scale.data.collate import collate_robot, collate_vl
from vla_scale.data.elastic import check_elastic_state, iter_elastic, loader_workers, virtual_readers
from vla_scale.data.format import Manifest
from vla_scale.data.locations import is_remote
from vla_scale.data.reader import BadSamples, DataError, Reader, state_mismatch
from vla_scale.data.stream import SourceStream
from vla_scale.data.wire import BatchLoader, to_wire


def batch_sources(seed: int, batch_index: int, weights: np.ndarray, kinds: list[str], size: int) -> list[int]:
    """Source index of each sample of global batch `batch_index` (same on every rank and worker).

    The batch's kind (robot or VL) is drawn by the kinds' total weights, so every rank takes
    the same model path at the same step and the ZeRO collectives line up; within that kind
    each sample picks its dataset by weight. Overall, source i supplies a share `weights[i]`.
    """
    if len(weights) == 1:  # one source: no draw to make (the common case; seeding an rng costs ~0.1 ms)
        return [0] * size
    rng = np.random.default_rng([seed, batch_index, 104729])
    names = sorted(set(kinds))
    totals = np.array([sum(w for w, k in zip(weights, kinds, strict=True) if k == name) for name in names])
    kind = names[int(rng.choice(len(names), p=totals / totals.sum()))]
    members = [i for i, k in enumerate(kinds) if k == kind]
    within = np.array([weights[i] for i in members])
    return [members[int(j)] for j in rng.choice(len(members), size=size, p=within / within.sum())]


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    """Which rank's stream under which seed, in batches of how many: with `DataConfig`, all that fixes the batches.

    Keyword-only: seed, rank and world size are adjacent ints, easy to swap.
    """

    seed: int
    rank: int
    world_size: int
    micro_batch_size: int
    global_batch_size: int = 0  # needed by `data.elastic` only (it fixes the number of virtual readers)


class MixedBatches(IterableDataset):
    """An infinite iterable of `Batch`es for one rank; shard reading happens in its workers.

    Everything a worker yields is a pure function of (seed, rank, world size, worker count,
    worker role), so the stream can be resumed exactly: `start_batch` = batches this rank
    already consumed. Worker roles are rotated by `start_batch % num_workers` so that the
    DataLoader's round-robin (which always starts at worker 0) hands out batch `start_batch`
    first, and each worker replays its earlier draws without decoding images.
    """

    def __init__(self, cfg: DataConfig, spec: StreamSpec, tokenizer: Any, resume: dict | None = None):
        """`resume` is a `StreamTracker.state_dict()` from a checkpoint: the stream then continues right after its
        last batch."""
        super().__init__()
        start_batch, bad_windows = 0, None
        if resume is not None and cfg.elastic:  # the position is a global step count (vla_scale/data/elastic.py)
            n_virtual = virtual_readers(spec.global_batch_size, spec.micro_batch_size)
            check_elastic_state(resume, spec.seed, n_virtual, spec.micro_batch_size)
            start_batch, bad_windows = int(resume["steps"]), resume.get("bad_windows")
        elif resume is not None:
            StreamTracker.check_compatible(resume, spec.seed, spec.world_size, cfg.num_workers, spec.micro_batch_size)
            start_batch, bad_windows = int(resume["batches"]), resume.get("bad_windows")
        self.cfg = cfg
        self.spec = spec
        self.tokenizer = tokenizer
        self.start_batch = start_batch
        self.bad_windows = {int(k): list(v) for k, v in (bad_windows or {}).items()}
        weights = np.array([s.weight for s in cfg.sources], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.manifests = [Manifest.load(s.path) for s in cfg.sources]

    def _streams(self, reader: Reader, bad: BadSamples, bad_windows: set[str]) -> list[SourceStream | None]:
        """One stream per source (None for weight 0), each remote one already fetching its first shards.

        Remote sources are opened in parallel threads: each reads stats.json (robot) at 1 request latency, and
        the mixer's first batch waits for all of them."""

        def stream(i: int) -> SourceStream | None:
            if self.weights[i] == 0:
                return None  # weight-0 sources are never scheduled
            src = self.cfg.sources[i]
            s = SourceStream(
                src.path,
                reader,
                seed=self.spec.seed + i,
                shuffle_buffer=self.cfg.shuffle_buffer,
                shard_shuffle=self.cfg.shard_shuffle,
                window_size=self.cfg.window_size,
                chunk=self.cfg.fwd_pred_next_n,
                bad=bad,
                bad_windows=bad_windows,
                augment=self.cfg.augment,
                max_bad_in_a_row=self.cfg.max_bad_in_a_row,
                storage=self.cfg.storage,
                manifest=self.manifests[i],  # read once, in the main process
            )
            s.start_fetching()
            return s

        indices = range(len(self.cfg.sources))
        if sum(is_remote(s.path) for s in self.cfg.sources) < 2:
            return [stream(i) for i in indices]
        with ThreadPoolExecutor(len(self.cfg.sources), thread_name_prefix="open-source") as pool:
            return list(pool.map(stream, indices))  # in order; the first source's error is raised first

    def __iter__(self) -> Iterator[Batch]:
        if self.cfg.elastic:
            yield from iter_elastic(self)
            return
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        role = (worker + self.start_batch) % num_workers
        bad = BadSamples(self.cfg.bad_sample_policy)
        bad_windows = set(self.bad_windows.get(role, []))
        sources = self._streams(Reader(self.spec.rank, self.spec.world_size, role, num_workers), bad, bad_windows)
        streams = [iter(s) if s is not None else None for s in sources]

        kinds = [m.kind for m in self.manifests]
        token_cache: dict[str, list[int]] = {}

        def sources_of(batch_index: int) -> list[int]:
            return batch_sources(self.spec.seed, batch_index, self.weights, kinds, self.spec.micro_batch_size)

        def draw(srcs: list[int]) -> list:
            items = []
            for src in srcs:
                stream = streams[src]
                assert stream is not None  # weight-0 sources are never drawn
                items.append(next(stream))
            return items

        replayed = len(range(role, self.start_batch, num_workers))
        for s in sources:
            if s is not None:
                s.replay = True
        for k in range(replayed):
            draw(sources_of(k * num_workers + role))
        for s in sources:
            if s is not None:
                s.replay = False

        k = replayed
        while True:
            batch_index = k * num_workers + role
            srcs = sources_of(batch_index)
            items = draw(srcs)
            if kinds[srcs[0]] == "robot":
                batch = collate_robot(items, self.tokenizer, self.cfg.max_text_len, token_cache)
            else:
                batch = collate_vl(items, self.tokenizer, self.cfg.max_text_len)
            batch.meta = {
                "sources": [self.manifests[i].name for i in srcs],
                "keys": [item.key for item in items],
                "worker": role,
                "batch_index": batch_index,
                "skipped": dict(bad.counts),
                "bad_windows": sorted(bad_windows),
            }
            yield batch
            k += 1


def reset_worker_signals(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: undo the rank's preemption handler in a forked worker.

    A worker inherits the rank's SIGTERM handler (vla_scale/train/preempt.py), which only counts the signal,
    so torch's `terminate()` of a stuck worker would do nothing: SIGTERM goes back to its default. SIGUSR1
    (the other preemption signal, which SLURM's `--signal` sends to every process of the step) is ignored
    instead: a worker killed by it would make torch raise in the rank while that rank saves its checkpoint.
    """
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def build_dataloader(cfg: DataConfig, spec: StreamSpec, tokenizer: Any, resume: dict | None = None) -> DataLoader:
    """DataLoader over `MixedBatches`; batches arrive fully collated (batch_size=None).

    `resume` is a `StreamTracker.state_dict()` from a checkpoint: the loader then continues
    exactly after the last batch that run consumed.
    """
    dataset = MixedBatches(cfg, spec, tokenizer, resume)
    workers = cfg.num_workers
    if cfg.elastic:
        workers = loader_workers(
            workers, virtual_readers(spec.global_batch_size, spec.micro_batch_size), spec.world_size
        )
    return BatchLoader(
        dataset,
        batch_size=None,
        num_workers=workers,
        collate_fn=to_wire,  # runs in the workers: small arrays travel by value (vla_scale/data/wire.py)
        worker_init_fn=reset_worker_signals,
        persistent_workers=workers > 0,
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=torch.cuda.is_available(),
    )


class StreamTracker:
    """Main-process view of the data stream: batches consumed, skip counts, bad windows per worker role.

    Its `state_dict()` goes into the checkpoint's client state; `build_dataloader(resume=...)`
    uses it to continue the stream exactly where this run stopped.
    """

    def __init__(
        self,
        seed: int,
        world_size: int,
        num_workers: int,
        micro_batch_size: int,
        resume: dict | None,
        *,
        virtual_readers: int = 0,
        readers: list[int] | None = None,
    ):
        """`virtual_readers` > 0: the `data.elastic` stream, whose position is the global step count; `readers`:
        the virtual readers this rank serves (their skip counts and bad windows are its to keep)."""
        self.seed, self.world_size = seed, world_size
        self.num_workers, self.micro_batch_size = num_workers, micro_batch_size
        self.virtual_readers = virtual_readers
        self.batches = int(resume["batches"]) if resume else 0
        self.steps = int((resume or {}).get("steps", 0))
        self.samples: dict[str, int] = dict((resume or {}).get("samples", {}))
        self._skipped: dict[int, dict[str, int]] = {int(k): v for k, v in (resume or {}).get("skipped", {}).items()}
        self._bad: dict[int, list[str]] = {int(k): v for k, v in (resume or {}).get("bad_windows", {}).items()}
        if readers is not None:  # elastic: keep only the virtual readers this rank serves now
            self._skipped = {k: v for k, v in self._skipped.items() if k in readers}
            self._bad = {k: v for k, v in self._bad.items() if k in readers}

    def update(self, batch: Batch) -> None:
        self.batches += 1
        if "global_step" in batch.meta:
            self.steps = batch.meta["global_step"] + 1  # a checkpoint comes after the step's last micro-batch
        for name in batch.meta.get("sources", []):
            self.samples[name] = self.samples.get(name, 0) + 1
        if "worker" in batch.meta:
            self._skipped[batch.meta["worker"]] = batch.meta.get("skipped", {})
            self._bad[batch.meta["worker"]] = batch.meta.get("bad_windows", [])

    def skipped(self) -> dict[str, int]:
        """Samples skipped so far per source name, summed over workers."""
        out: dict[str, int] = {}
        for counts in self._skipped.values():
            for name, n in counts.items():
                out[name] = out.get(name, 0) + n
        return out

    def mix(self) -> dict[str, float]:
        """Share of samples each source supplied so far (compare with the configured weights)."""
        total = sum(self.samples.values())
        return {name: n / total for name, n in sorted(self.samples.items())} if total else {}

    def state_dict(self) -> dict:
        elastic = {"elastic": True, "steps": self.steps, "virtual_readers": self.virtual_readers}
        return {
            **(elastic if self.virtual_readers else {}),
            "batches": self.batches,
            "samples": dict(self.samples),
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "micro_batch_size": self.micro_batch_size,
            "skipped": {str(k): v for k, v in self._skipped.items()},
            "bad_windows": {str(k): v for k, v in self._bad.items()},
        }

    @staticmethod
    def check_compatible(state: dict, seed: int, world_size: int, num_workers: int, micro_batch_size: int) -> None:
        """Exact resume replays the same readers; a different split would repeat or skip samples, so refuse."""
        now = {"seed": seed, "world_size": world_size, "num_workers": num_workers, "micro_batch_size": micro_batch_size}
        details = state_mismatch(state, now)
        if details:
            raise DataError(
                f"cannot resume the data stream exactly ({details}): the checkpoint's stream position is only "
                "valid for the same ranks, workers, micro batch and seed; resume with those settings or start "
                "a new run from these weights"
            )
