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
launcher passes a rank's exit code through; torchrun and `accelerate launch` report their own failure code, so
launchers/torchrun.sh and launchers/accelerate.sh start them through small wrappers that exit 75 instead
(vla_scale/train/torchrun_launch.py, accelerate_launch.py; the rule is `preempted_exit_code` below).
"""

from __future__ import annotations

import signal
import sys
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


def preempted_exit_code(failures: dict) -> int | None:
    """For a torch elastic agent's failed ranks (`ChildFailedError.failures`, behind torchrun and `accelerate launch`):
    `EXIT_PREEMPTED` when some rank exited with it and every other failed rank either did too or died of a
    signal, else None.

    The agent terminates the remaining ranks once one has exited (SIGTERM, SIGKILL after a grace period), so
    those show up with negative codes: consequences of the preemption, not causes. Any positive code other
    than 75 is a real failure. (torch's failure timestamps are whole seconds, too coarse to order them.)"""
    codes = [failure.exitcode for failure in failures.values()]
    if EXIT_PREEMPTED in codes and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
        return EXIT_PREEMPTED
    return None


def preempted_or_raise(err: Exception, launcher: str) -> int:
    """`EXIT_PREEMPTED`, after a line on stderr, when a launcher's `ChildFailedError` is a preemption; else re-raises
    it (the launcher's usual failure report and exit code)."""
    code = preempted_exit_code(err.failures)
    if code is None:
        raise err
    ranks = ", ".join(f"rank {rank}: {f.exitcode}" for rank, f in sorted(err.failures.items()))
    print(f"[{launcher}] ranks stopped for preemption ({ranks}); exiting {code}", file=sys.stderr, flush=True)
    return code
