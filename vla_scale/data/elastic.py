"""World-size-independent data order (`data.elastic: true`): the stream position is one global step count.

Why: the default loader gives every (rank, worker) its own reader, so its stream position means something
only for the same ranks × workers, and a checkpoint cannot be resumed on another number of ranks. Here
the readers are *virtual* and their number is fixed by the run, not by the job (the canonical nodes of
MosaicML streaming): V = global_batch_size / micro_batch_size, one per micro-batch of an optimizer step.

- Virtual reader v is today's reader `Reader(rank=v, world_size=V)`: per epoch the shard list is
  shuffled by (seed, epoch) and dealt over the V readers, and v's shuffle buffer draws from an RNG
  seeded by (seed, v). So every sample is read by exactly one virtual reader per epoch, whatever the job.
- Optimizer step g consists of micro-batch g of every virtual reader. Its kind (robot or VL) is drawn
  from (seed, g), the same for the whole step, so the ranks take the same model path at every micro-step
  at any world size; each slot's dataset within the kind from (seed, g, v). Augmentation draws were
  already a function of (seed, epoch, window key).
- A job of W ranks (W divides V) runs A = V / W accumulation micro-steps: rank r's micro-step a is
  virtual reader a·W + r. Its DataLoader workers split the rank's virtual readers (gcd(workers, A) workers).

So the content of global step g is a function of (seed, g) alone; only who computes which micro-batch
changes with W. The checkpoint stores g (`steps`) and, per virtual reader, the windows that failed to
decode (gathered from every rank), which is all a resume on any W needs: each rank fast-forwards its
virtual readers by g micro-batches, reading shards but decoding no image, as the default mode does.

Compared with the default mode the mixing granularity is coarser (a whole optimizer step is robot or VL,
instead of each micro-batch) and every virtual reader keeps its own shuffle buffer (V buffers in all
instead of ranks × workers); see README "Preemption and elastic resume" for the measured shuffle quality.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from torch.utils.data import get_worker_info

from vla_scale.data.batch import Batch
from vla_scale.data.collate import collate_robot, collate_vl
from vla_scale.data.reader import BadSamples, DataError, Reader, state_mismatch


def virtual_readers(global_batch_size: int, micro_batch_size: int) -> int:
    """V: micro-batches per optimizer step, fixed for the whole run (the global batch is)."""
    if global_batch_size <= 0 or global_batch_size % micro_batch_size:
        raise DataError(
            f"data.elastic needs the global batch ({global_batch_size}) as a multiple of the micro batch "
            f"({micro_batch_size})"
        )
    return global_batch_size // micro_batch_size


def rank_virtual_readers(num_virtual: int, world_size: int, rank: int) -> list[int]:
    """Virtual readers of `rank` in micro-step order: micro-step a is virtual reader a·W + rank."""
    if num_virtual % world_size:
        raise DataError(
            f"data.elastic: {world_size} ranks cannot share {num_virtual} micro-batches per step evenly; use a "
            f"number of ranks that divides global_batch_size / micro_batch_size = {num_virtual}"
        )
    return list(range(rank, num_virtual, world_size))


def loader_workers(num_workers: int, num_virtual: int, world_size: int) -> int:
    """DataLoader workers for a rank: a divisor of its micro-steps per step, so each virtual reader stays in
    one worker (the DataLoader hands batches out round-robin from worker 0)."""
    return math.gcd(num_workers, num_virtual // world_size) if num_workers > 0 else 0


def step_sources(seed: int, step: int, virtual: int, weights: np.ndarray, kinds: list[str], size: int) -> list[int]:
    """Source index of each sample of virtual reader `virtual`'s micro-batch in optimizer step `step`.

    The kind is drawn per step (same for every virtual reader), then each sample's dataset within it.
    """
    names = sorted(set(kinds))
    totals = np.array([sum(w for w, k in zip(weights, kinds, strict=True) if k == name) for name in names])
    kind = names[int(np.random.default_rng([seed, step, 104729]).choice(len(names), p=totals / totals.sum()))]
    members = [i for i, k in enumerate(kinds) if k == kind]
    within = np.array([weights[i] for i in members])
    rng = np.random.default_rng([seed, step, virtual, 130363])
    return [members[int(j)] for j in rng.choice(len(members), size=size, p=within / within.sum())]


def check_elastic_state(state: dict, seed: int, num_virtual: int, micro_batch_size: int) -> None:
    """A checkpoint's data state must come from an elastic run with the same seed and batch split."""
    if not state.get("elastic"):
        raise DataError(
            "the checkpoint's data position was written without data.elastic (per-rank readers); resume it with "
            "data.elastic=false and the same ranks, or start a new run with data.elastic=true"
        )
    now = {"seed": seed, "virtual_readers": num_virtual, "micro_batch_size": micro_batch_size}
    details = state_mismatch(state, now)
    if details:
        raise DataError(
            f"cannot resume the elastic data stream ({details}): the global batch, micro batch and seed must stay "
            "as the run started (the number of ranks and workers may change)"
        )


def iter_elastic(dataset) -> Iterator[Batch]:
    """`MixedBatches.__iter__` under `data.elastic`: this worker's share of its rank's virtual readers."""
    spec, cfg = dataset.spec, dataset.cfg
    info = get_worker_info()
    worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
    num_virtual = virtual_readers(spec.global_batch_size, spec.micro_batch_size)
    mine = rank_virtual_readers(num_virtual, spec.world_size, spec.rank)[worker::num_workers]
    kinds = [m.kind for m in dataset.manifests]
    bads, sources = {}, {}
    for v in mine:
        bads[v] = BadSamples(cfg.bad_sample_policy)
        bad_windows = set(dataset.bad_windows.get(v, []))
        sources[v] = (dataset._streams(Reader(v, num_virtual, 0, 1), bads[v], bad_windows), bad_windows)
    streams = {v: [iter(s) if s is not None else None for s in srcs] for v, (srcs, _) in sources.items()}

    def draw(step: int, v: int) -> tuple[list[int], list]:
        srcs = step_sources(spec.seed, step, v, dataset.weights, kinds, spec.micro_batch_size)
        return srcs, [next(streams[v][i]) for i in srcs]

    def set_replay(on: bool) -> None:
        for srcs, _ in sources.values():
            for s in srcs:
                if s is not None:
                    s.replay = on

    set_replay(True)
    for step in range(dataset.start_batch):  # start_batch counts optimizer steps here
        for v in mine:
            draw(step, v)
    set_replay(False)
    step = dataset.start_batch
    while True:
        for v in mine:
            srcs, items = draw(step, v)
            collate = collate_robot if kinds[srcs[0]] == "robot" else collate_vl
            batch = collate(items, dataset.tokenizer, cfg.max_text_len)
            batch.meta = {
                "sources": [dataset.manifests[i].name for i in srcs],
                "keys": [item.key for item in items],
                "worker": v,  # the tracker keeps skip counts and bad windows per virtual reader
                "global_step": step,
                "batch_index": step * num_virtual + v,
                "skipped": dict(bads[v].counts),
                "bad_windows": sorted(sources[v][1]),
            }
            yield batch
        step += 1
