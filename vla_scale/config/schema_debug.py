"""`debug:` — drill and test hooks, off by default. They replace the old environment variables
(`VLA_SCALE_INJECT_NAN`, `VLA_SCALE_SAVE_PAUSE_S`, `VLA_SCALE_SHM_ALLREDUCE`) so a drill is written
down in the run's config.yaml, checked at load time, and visible in `config_diff`.

None of them changes what a healthy run learns, so they may differ when a run is resumed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import NamedTuple

from vla_scale.config.errors import ConfigError, suggest
from vla_scale.config.schema_model import LossWeightsConfig

# The loss terms RoboVLM returns: `loss` (the weighted total) and one `loss_<name>` per weight in
# `model.loss_weights` (arm, gripper, vl, action_ce, clip).
LOSS_TERMS = ("loss", *(f"loss_{f.name}" for f in fields(LossWeightsConfig)))

_INJECT_SYNTAX = "'term@step[,step...][:rankR]', e.g. 'loss_arm@3,4' or 'loss@2:rank1'"


class NanInjection(NamedTuple):
    """A parsed `debug.inject_nan`: which term turns NaN, at which 1-based optimizer steps, on which rank."""

    term: str
    steps: frozenset[int]
    rank: int | None  # None: every rank


def parse_inject_nan(text: str, key: str = "debug.inject_nan") -> NanInjection | None:
    """`"term@s1,s2[:rankR]"` → NanInjection; "" → None. Raises ConfigError naming `key` on bad syntax."""
    if not text:
        return None
    spec, colon, only = text.partition(":")
    term, at, steps = spec.partition("@")
    if not at or not term or not steps or (colon and not only):
        raise ConfigError(f"{key}={text!r}: expected {_INJECT_SYNTAX}")
    if term not in LOSS_TERMS:
        raise ConfigError(f"{key}={text!r}: {term!r} is not a loss term the model returns.{suggest(term, LOSS_TERMS)}")
    parsed = set()
    for s in steps.split(","):
        if not re.fullmatch(r"[1-9][0-9]*", s.strip()):
            raise ConfigError(f"{key}={text!r}: step {s!r} must be an optimizer step >= 1; expected {_INJECT_SYNTAX}")
        parsed.add(int(s))
    rank = None
    if only:
        match = re.fullmatch(r"rank([0-9]+)", only)
        if match is None:
            raise ConfigError(f"{key}={text!r}: {only!r} must look like rank0, rank1, ...; expected {_INJECT_SYNTAX}")
        rank = int(match.group(1))
    return NanInjection(term, frozenset(parsed), rank)


@dataclass
class DebugConfig:
    """Drill hooks for tests and fault drills; leave them at their defaults for real runs."""

    # Replace one loss term with NaN at chosen optimizer steps (1-based), optionally on one rank only:
    # "loss_arm@3,4" or "loss@2:rank1". Exercises the non-finite step guard end to end.
    inject_nan: str = ""
    # Hold every rank this many seconds inside each checkpoint save, after the files are written and
    # before `latest` moves, so a drill can kill the job mid-save. 0: off.
    save_pause_s: float = 0.0
    # CPU runs: build DeepSpeed's shared-memory all-reduce op (a 40-80 s JIT compile that training does
    # not need, so it is skipped unless this is on).
    shm_allreduce: bool = False

    def validate(self, prefix: str = "debug") -> None:
        """Reject a malformed drill before any rank starts."""
        parse_inject_nan(self.inject_nan, f"{prefix}.inject_nan")
        if self.save_pause_s < 0:
            raise ConfigError(f"{prefix}.save_pause_s must be >= 0 (0 turns the pause off), got {self.save_pause_s}")

    def check_world_size(self, world_size: int, prefix: str = "debug") -> None:
        """An `inject_nan` limited to one rank must name a rank the job has."""
        injection = parse_inject_nan(self.inject_nan, f"{prefix}.inject_nan")
        if injection is not None and injection.rank is not None and injection.rank >= world_size:
            raise ConfigError(
                f"{prefix}.inject_nan={self.inject_nan!r} names rank{injection.rank} but the job has "
                f"{world_size} ranks (rank0 to rank{world_size - 1})"
            )

    def nan_injection(self) -> NanInjection | None:
        """The parsed `inject_nan` (None when off)."""
        return parse_inject_nan(self.inject_nan)
