"""The log window: everything measured between two log steps, reduced across ranks once at log time.

Loss terms go into `Meters` (one running sum per key, kept on the device); throughput counters
(samples, tokens, time waiting for data, wall time) are summed over ranks in one all-reduce on the
accelerator's device, since NCCL cannot all-reduce CPU tensors.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist

from vla_scale.train.metrics import Meters


def collective_device() -> torch.device:
    """Where tensors for collectives must live: the accelerator DeepSpeed runs on (cuda:N, or cpu for gloo)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


class LogWindow:
    """Meters per loss key plus throughput counters for the steps since the last log."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.meters = Meters()
        self._reset()

    def _reset(self) -> None:
        self.start = time.perf_counter()
        self.data_wait = 0.0
        self.samples = 0
        self.tokens: torch.Tensor | int = 0

    def add_fetch(self, seconds: float) -> None:
        """Time this rank spent waiting for its next batch."""
        self.data_wait += seconds

    def add_micro_step(self, batch_size: int, num_tokens: torch.Tensor) -> None:
        """Samples and text tokens of one micro-step (the token count stays on the device)."""
        self.samples += batch_size
        self.tokens = self.tokens + num_tokens

    def add(self, values: dict[str, Any]) -> None:
        """Values to average over the window (loss terms, grad norm, memory reports)."""
        self.meters.add(values)

    def close(self, skipped_samples: int = 0) -> tuple[dict[str, float], dict[str, float]]:
        """Collective: (means of every key over all ranks, throughput and totals); starts the next window.

        `skipped_samples` is this rank's running count of bad samples; it is summed over ranks here
        (in the same all-reduce) because each rank reads different shards and logs only its own.
        """
        values = self.meters.reduce()
        elapsed = time.perf_counter() - self.start
        totals = torch.tensor(
            [self.samples, float(self.tokens), self.data_wait, elapsed, skipped_samples],
            dtype=torch.float64,
            device=collective_device(),
        )
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(totals)
        samples, tokens, data_wait, rank_seconds, skipped = totals.tolist()
        wall = rank_seconds / self.world_size
        rates = {
            "samples_per_s": samples / wall,
            "tokens_per_s": tokens / wall,
            "data_wait_frac": data_wait / max(rank_seconds, 1e-9),
            "skipped_samples": int(skipped),
        }
        self._reset()
        return values, rates
