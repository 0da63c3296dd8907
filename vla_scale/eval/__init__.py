"""Closed-loop evaluation: simulator suites behind one `Env` contract.

`make_env("instruct")` is our own language-grounding scene; `make_env("metaworld")` wraps
Meta-World tasks. Suites are imported lazily, so importing this package needs no simulator.
"""

from vla_scale.eval.env import ActionSpace, Env, EnvObservation, StepResult
from vla_scale.eval.registry import SUITES, make_env
from vla_scale.eval.seeds import collect_seed, eval_seed

__all__ = [
    "SUITES",
    "ActionSpace",
    "Env",
    "EnvObservation",
    "StepResult",
    "collect_seed",
    "eval_seed",
    "make_env",
]
