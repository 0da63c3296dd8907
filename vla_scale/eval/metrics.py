"""Success rates with confidence intervals, per task and overall.

Why Wilson: with 10-50 episodes per task and rates near 0 or 1 (a random agent, a good
policy), the normal-approximation interval collapses to a point or leaves [0, 1]; the
Wilson score interval stays inside [0, 1] and keeps its coverage at small n.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval (lower, upper) for `successes` out of `n`; (0, 1) when n == 0."""
    if n < 0 or not 0 <= successes <= max(n, 0):
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # at 0 or n successes the bound is exactly 0 or 1; the subtraction leaves rounding residue
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def rate(flags: Sequence[bool]) -> dict:
    """`{"rate", "successes", "n", "ci95": [lo, hi]}` of a list of outcomes."""
    k, n = sum(bool(f) for f in flags), len(flags)
    lo, hi = wilson_interval(k, n)
    return {"rate": k / n if n else float("nan"), "successes": k, "n": n, "ci95": [lo, hi]}


def summarize_episodes(episodes: Iterable[dict], tasks: Sequence[str], swap: bool = False) -> dict:
    """Per-task and overall figures from episode records (`task`, `success`, `length`, and with `swap`:
    `followed`, `original`). Overall pools every episode, so tasks weigh by their episode counts."""
    episodes = list(episodes)
    keys = ("success", "followed", "original") if swap else ("success",)

    def block(eps: list[dict]) -> dict:
        out = {key: rate([e[key] for e in eps]) for key in keys}
        out["episodes"] = len(eps)
        out["mean_length"] = sum(e["length"] for e in eps) / len(eps) if eps else float("nan")
        out.update(_chunk_figures(eps))
        return out

    per_task = {task: block([e for e in episodes if e["task"] == task]) for task in tasks}
    return {"tasks": per_task, "overall": block(episodes)}


def _chunk_figures(episodes: list[dict]) -> dict:
    """How a policy's chunks joined (policy agents' `episode_info`): the action's mean L2 change at a chunk
    switch and within a chunk, and the departure from the replaced chunk's plan at a switch, pooled over every
    step of these episodes; the counts, stalled steps and stale rows summed."""
    out: dict = {}
    weighted = (
        ("switch_jump", "chunk_switches"),
        ("step_jump", "steps_within_chunks"),
        ("switch_departure", "planned_switches"),
    )
    for key, count in weighted:
        pairs = [(e[key], e[count]) for e in episodes if e.get(key) is not None]
        weight = sum(n for _, n in pairs)
        if weight:
            out[key] = sum(v * n for v, n in pairs) / weight
    for key in ("chunk_switches", "steps_within_chunks", "planned_switches", "stalled_steps", "stale_rows_skipped"):
        if any(key in e for e in episodes):
            out[key] = sum(e.get(key, 0) for e in episodes)
    return out
