"""Preemption: on `train.preempt_signal` every rank finishes its optimizer step, saves, and exits `EXIT_PREEMPTED`.

Why an agreement: a scheduler signals the ranks of a job at slightly different moments (or only
some of them), but a checkpoint is a collective. So the signal handler only records that the signal
was seen; at every step boundary the ranks all-reduce (max) that flag, and all of them stop at the
first step where any rank had seen it. The checkpoint then goes through the normal atomic save
(`checkpoint.save`): files first, `latest` last, so a further signal during the save changes nothing
(the handler stays installed until the process exits and only sets the flag again), and a SIGKILL
during it leaves the previous `latest` in place.

`EXIT_PREEMPTED` (75, sysexits' EX_TEMPFAIL: "try again later") tells a wrapper such as
launchers/slurm.sbatch that the run stopped early on purpose and should be requeued; the DeepSpeed
launcher passes a rank's exit code through, launchers/accelerate.sh too (vla_scale/train/accelerate_launch.py),
torchrun reports its own failure code instead (README).
"""

from __future__ import annotations

import signal
import time

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75
SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGUSR1": signal.SIGUSR1}


class Preemption:
    """The signal handler's flag and the per-step collective that turns it into one decision for all ranks."""

    def __init__(self, signal_name: str):
        self.signal_name = signal_name
        self.seen = 0  # signals received by this rank (the handler only counts: it may run inside a save)
        self.first_seen_at: float | None = None
        if signal_name != "none":
            signal.signal(SIGNALS[signal_name], self._handle)

    def _handle(self, signum: int, frame) -> None:
        self.seen += 1
        if self.first_seen_at is None:
            self.first_seen_at = time.monotonic()

    def agreed(self) -> bool:
        """Collective, once per optimizer step on every rank: True when any rank has seen the signal."""
        if self.signal_name == "none":
            return False
        from vla_scale.train.log_window import collective_device

        flag = torch.tensor([int(self.seen > 0)], dtype=torch.int32, device=collective_device())
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
