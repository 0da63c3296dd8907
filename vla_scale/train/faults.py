"""Non-finite steps: skip them, count them, and stop after too many in a row.

The optimizers refuse a step whose gradients are NaN/inf (DeepSpeed's overflow check under
ZeRO and fp16/bf16, `GuardedAdamW` otherwise), and every rank reaches the same verdict.
`StepGuard` turns that verdict into bookkeeping: it names the loss terms that were not
finite, keeps the skipped step's values out of the metrics, and raises `TooManyBadSteps`
after `train.max_bad_steps` consecutive skips.

`debug.inject_nan: "loss_arm@3,4"` (optionally `...@3,4:rank1`) replaces that term with NaN
at those optimizer steps, so the path above can be exercised end to end in tests and drills.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from vla_scale.config.schema_debug import NanInjection


class TooManyBadSteps(RuntimeError):
    """`train.max_bad_steps` consecutive optimizer steps had a non-finite loss or gradient."""


class StepGuard:
    """Per-step verdict on skipped optimizer steps; identical on every rank (the skip decision is global)."""

    def __init__(self, max_bad_steps: int, fp16: bool):
        self.max_bad_steps = max_bad_steps
        self.fp16 = fp16  # fp16 overflow skips are the loss scaler's normal work, not faults
        self.skipped_total = 0
        self.streak = 0
        self.streak_start = 0

    def after_step(self, step: int, skipped: bool, outs: Sequence[dict[str, torch.Tensor]]) -> bool:
        """Record optimizer step `step` (1-based); returns True when it was skipped. Raises after too many."""
        if not skipped:
            self.streak = 0
            return False
        self.skipped_total += 1
        bad_terms = nonfinite_terms(outs)
        if self.fp16 and not bad_terms:
            return True  # gradient overflow at this loss scale; the scaler lowers it
        if self.streak == 0:
            self.streak_start = step
        self.streak += 1
        if self.streak >= self.max_bad_steps:
            what = ", ".join(bad_terms) if bad_terms else "the gradients (all loss terms were finite)"
            raise TooManyBadSteps(
                f"steps {self.streak_start}-{step}: {self.streak} optimizer steps in a row skipped for "
                f"non-finite values; at step {step} in {what}. Lower optim.lr, check the data "
                "(`python -m data_tools verify`), or raise train.max_bad_steps"
            )
        return True


def nonfinite_terms(outs: Sequence[dict[str, torch.Tensor]]) -> list[str]:
    """Names of the terms that were NaN/inf in any micro-step (one host sync; called only on skipped steps)."""
    bad: set[str] = set()
    for out in outs:
        for key, value in out.items():
            v = value.detach().float() if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            if not bool(torch.isfinite(v).all()):
                bad.add(key)
    return sorted(bad)


class NanInjector:
    """Test/drill hook: make one loss term NaN at chosen optimizer steps (see the module docstring)."""

    def __init__(self, rank: int, injection: NanInjection | None):
        applies = injection is not None and injection.rank in (None, rank)
        self.injection = injection if applies else None

    def __call__(self, step: int, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.injection is None or step not in self.injection.steps:
            return out
        term = self.injection.term
        if term not in out:
            raise KeyError(f"debug.inject_nan: the model returned no term {term!r}; it has {sorted(out)}")
        poisoned = dict(out)
        poisoned[term] = out[term] * math.nan
        if term != "loss":
            poisoned["loss"] = out["loss"] + poisoned[term]
        return poisoned
