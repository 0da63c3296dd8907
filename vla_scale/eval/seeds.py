"""Disjoint seed ranges for demonstration collection and evaluation.

Collection seeds lie in [0, 2**30) and evaluation seeds in [2**30, 2**31), so no evaluation
episode ever starts from a scene the policy was trained on. Within a range the seed is
`base + task_index * 2**20 + episode`: deterministic, distinct for every (task, episode) pair,
and readable back with `split_seed`. Up to 1024 tasks and 2**20 episodes per task.
"""

from __future__ import annotations

COLLECT_BASE = 0
EVAL_BASE = 2**30
EPISODE_BITS = 20
MAX_TASKS = 2**30 // 2**EPISODE_BITS  # 1024
MAX_EPISODES = 2**EPISODE_BITS


def _seed(base: int, task_index: int, episode: int) -> int:
    if not 0 <= task_index < MAX_TASKS:
        raise ValueError(f"task_index must be in [0, {MAX_TASKS}), got {task_index}")
    if not 0 <= episode < MAX_EPISODES:
        raise ValueError(f"episode must be in [0, {MAX_EPISODES}), got {episode}")
    return base + (task_index << EPISODE_BITS) + episode


def collect_seed(task_index: int, episode: int) -> int:
    """Seed of demonstration `episode` of the task at `task_index`; in [0, 2**30)."""
    return _seed(COLLECT_BASE, task_index, episode)


def eval_seed(task_index: int, episode: int) -> int:
    """Seed of evaluation `episode` of the task at `task_index`; in [2**30, 2**31)."""
    return _seed(EVAL_BASE, task_index, episode)


def is_eval_seed(seed: int) -> bool:
    """Whether `seed` lies in the held-out evaluation range."""
    return EVAL_BASE <= seed < 2 * EVAL_BASE


def split_seed(seed: int) -> tuple[str, int, int]:
    """Inverse of the two functions: ("collect" | "eval", task_index, episode)."""
    if not 0 <= seed < 2 * EVAL_BASE:
        raise ValueError(f"seed {seed} is outside [0, 2**31)")
    kind = "eval" if is_eval_seed(seed) else "collect"
    rest = seed - (EVAL_BASE if kind == "eval" else COLLECT_BASE)
    return kind, rest >> EPISODE_BITS, rest & (MAX_EPISODES - 1)
