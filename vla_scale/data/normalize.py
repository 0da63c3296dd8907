"""Action and state normalisation from a dataset's stats.json.

Arm action (and state) dimensions are z-scored with the dataset mean/std so every dimension has
a comparable loss scale; the last action dimension is the gripper and becomes a
binary target in {0, 1} (closed when > 0.5) for the BCE head. The policy uses
`unnormalize_action` to give users actions in their robot's units again.

A dimension whose std is below `MIN_STD` is constant in the dataset: it is normalised with std 1
(so it trains as `value - mean`, 0 on the data) instead of being divided by ~0, which would turn
float noise or any unseen value into huge targets. `constant_dims` lists them; `vla-scale prepare`
reports them before launch.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-6
MIN_STD = 1e-6  # std below this: the dimension is constant (float noise only); normalised with std 1


def safe_std(std: np.ndarray) -> np.ndarray:
    """`std`, with 1 where a dimension is constant (std < MIN_STD): what the normaliser divides by (plus EPS)."""
    return np.where(std < MIN_STD, np.float32(1.0), std).astype(np.float32)


def constant_dims(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, list[int]]:
    """Dimensions normalised with std 1 because they are constant, by array name; the gripper (last) dims excluded,
    as they are binarised, not z-scored."""
    return {name: [int(i) for i in np.flatnonzero(stats[name]["std"][:-1] < MIN_STD)] for name in ("action", "state")}


class Normalizer:
    """Holds one dataset's action/state statistics."""

    def __init__(self, stats: dict[str, dict[str, np.ndarray]]):
        self.action_mean = stats["action"]["mean"][:-1]
        self.action_std = safe_std(stats["action"]["std"][:-1])
        self.state_mean = stats["state"]["mean"]
        self.state_std = safe_std(stats["state"]["std"])

    def normalize_action(self, action: np.ndarray) -> np.ndarray:
        """`[..., A]` raw → arm z-scored, gripper in {0, 1}."""
        out = np.empty_like(action, dtype=np.float32)
        out[..., :-1] = (action[..., :-1] - self.action_mean) / (self.action_std + EPS)
        out[..., -1] = (action[..., -1] > 0.5).astype(np.float32)
        return out

    def unnormalize_action(self, arm: np.ndarray, gripper: np.ndarray) -> np.ndarray:
        """Normalised arm `[..., A-1]` and gripper probability `[..., 1]` → raw `[..., A]`."""
        raw_arm = arm * (self.action_std + EPS) + self.action_mean
        return np.concatenate([raw_arm, (gripper > 0.5).astype(raw_arm.dtype)], axis=-1)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        """`[..., S]` raw → arm dims z-scored, last (gripper) dim in {0, 1} like the action's."""
        out = ((state - self.state_mean) / (self.state_std + EPS)).astype(np.float32)
        out[..., -1] = (state[..., -1] > 0.5).astype(np.float32)
        return out
