"""Batches on their way from a DataLoader worker to the rank: small arrays by value, large ones in shared memory.

Why: torch sends every tensor a worker returns through its own shared-memory segment and file descriptor,
which costs ~0.1-0.3 ms per tensor on each side however small it is. A robot batch has eight tensors, so at
micro batch 1 that bookkeeping, not decoding, set the loader's pace. Arrays under `SHARED_MIN_BYTES` travel
pickled inside the message instead (as numpy, zero-copy views of the tensors), and are turned back into
tensors (zero-copy again) when the rank takes the batch; frames of large batches keep the shared segment,
which spares copying megabytes through the pipe.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from vla_scale.data.batch import Batch

SHARED_MIN_BYTES = 256 * 1024
_FIELDS = tuple(f.name for f in fields(Batch))


def to_wire(batch: Batch) -> Batch:
    """In a worker: the batch with its small tensors as numpy arrays (in the rank's own process: unchanged)."""
    if get_worker_info() is None or not isinstance(batch, Batch):
        return batch
    small = {
        name: value.numpy()
        for name in _FIELDS
        if isinstance(value := getattr(batch, name), torch.Tensor) and value.nbytes < SHARED_MIN_BYTES
    }
    return replace(batch, **small)


def from_wire(batch: Batch) -> Batch:
    """In the rank: numpy arrays back to tensors (sharing their memory)."""
    if not isinstance(batch, Batch):
        return batch
    arrays = {name: torch.from_numpy(v) for name in _FIELDS if isinstance(v := getattr(batch, name), np.ndarray)}
    return replace(batch, **arrays) if arrays else batch


class BatchLoader(DataLoader):
    """A DataLoader whose workers send batches through `to_wire`; iterating it yields ordinary `Batch`es.

    Without workers the dataset (which yields whole batches) is iterated directly.
    """

    def __iter__(self) -> Iterator[Batch]:  # type: ignore[override]
        if self.num_workers == 0:  # torch's single-process iterator adds only bookkeeping, ~20 us a batch
            for batch in self.dataset:  # type: ignore[attr-defined]
                yield batch.pin_memory() if self.pin_memory else batch
            return
        for batch in super().__iter__():
            yield from_wire(batch)
