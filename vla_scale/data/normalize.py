"""Action and state normalisation from a dataset's stats.json and its declared spaces (`vla_scale.data.spaces`).

Regressed dimensions are scaled so every dimension has a comparable loss scale: `mean_std` z-scores them,
`min_max` maps [min, max] and `q01_q99` maps [q01, q99] to [-1, 1] (q01_q99 clips outliers to it). Binary
dimensions become 0/1 targets (1 when above the declared threshold) for the BCE head and are not scaled.
The normalised array holds the regressed dimensions first, then the binary ones (`Space.order`); the policy
uses `unnormalize_action` to give users actions in their robot's units and dimension order again.

A dimension whose spread (std, or half the range) is below `MIN_STD` is constant in the dataset: it is scaled
by 1 (so it trains as `value - centre`, 0 on the data) instead of being divided by ~0, which would turn float
noise or any unseen value into huge targets. `constant_dims` lists them; `vla-scale prepare` reports them.
"""

from __future__ import annotations

import numpy as np

from vla_scale.data.spaces import Space, Spaces

EPS = 1e-6
MIN_STD = 1e-6  # spread below this: the dimension is constant (float noise only); scaled by 1


def safe_std(std: np.ndarray) -> np.ndarray:
    """`std`, with 1 where a dimension is constant (std < MIN_STD): what the normaliser divides by (plus EPS)."""
    return np.where(std < MIN_STD, np.float32(1.0), std).astype(np.float32)


def _centre_spread(stats: dict[str, np.ndarray], mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension (centre, spread) of a normalisation mode: x → (x - centre) / spread."""
    if mode == "mean_std":
        return stats["mean"], stats["std"]
    low, high = (stats["min"], stats["max"]) if mode == "min_max" else (stats["q01"], stats["q99"])
    return ((high + low) / 2).astype(np.float32), ((high - low) / 2).astype(np.float32)


def constant_dims(stats: dict[str, dict[str, np.ndarray]], spaces: Spaces | None = None) -> dict[str, list[int]]:
    """Regressed dimensions scaled by 1 because they are constant, by array name (binary dims are not scaled).
    `spaces` None: the legacy layout (last dimensions binary, mean/std)."""
    spaces = spaces or Spaces.legacy(len(stats["action"]["mean"]), len(stats["state"]["mean"]))
    out = {}
    for name in ("action", "state"):
        regressed = list(getattr(spaces, name).regressed)
        spread = _centre_spread(stats[name], spaces.normalization)[1][regressed]
        out[name] = [regressed[int(i)] for i in np.flatnonzero(spread < MIN_STD)]
    return out


class ArrayNormalizer:
    """One array's normalisation: regressed dims scaled, binary dims thresholded, reordered as `space.order`."""

    def __init__(self, stats: dict[str, np.ndarray], space: Space, mode: str):
        self.space = space
        self.regressed = list(space.regressed)
        self.binary = list(space.binary)
        centre, spread = _centre_spread(stats, mode)
        self.centre = centre[self.regressed]
        self.scale = safe_std(spread[self.regressed]) + EPS
        self.clip = mode == "q01_q99"
        self.thresholds = np.asarray(space.thresholds, dtype=np.float64)  # one per binary dim

    def normalize(self, x: np.ndarray) -> np.ndarray:
        """`[..., D]` raw, dataset order → `[..., D]` float32: regressed dims scaled, then binary dims in {0, 1}."""
        out = np.empty(x.shape, dtype=np.float32)
        r = len(self.regressed)
        out[..., :r] = (x[..., self.regressed] - self.centre) / self.scale
        if self.clip:
            np.clip(out[..., :r], -1.0, 1.0, out=out[..., :r])
        out[..., r:] = (x[..., self.binary] > self.thresholds).astype(np.float32)
        return out

    def unnormalize(self, regressed: np.ndarray, binary: np.ndarray) -> np.ndarray:
        """Normalised regressed dims `[..., R]` and binary probabilities `[..., G]` → raw `[..., D]`, dataset order."""
        raw = regressed * self.scale + self.centre
        out = np.empty((*raw.shape[:-1], self.space.dim), dtype=raw.dtype)
        out[..., self.regressed] = raw
        pairs = np.asarray(self.space.value_pairs, dtype=np.float64).reshape(-1, 2)  # [G, 2]
        out[..., self.binary] = np.where(binary > 0.5, pairs[:, 1], pairs[:, 0]).astype(raw.dtype)
        return out


class Normalizer:
    """Holds one dataset's action/state statistics and declared spaces (`spaces` None: the legacy layout)."""

    def __init__(self, stats: dict[str, dict[str, np.ndarray]], spaces: Spaces | None = None):
        self.spaces = spaces or Spaces.legacy(len(stats["action"]["mean"]), len(stats["state"]["mean"]))
        self.action = ArrayNormalizer(stats["action"], self.spaces.action, self.spaces.normalization)
        self.state = ArrayNormalizer(stats["state"], self.spaces.state, self.spaces.normalization)

    def normalize_action(self, action: np.ndarray) -> np.ndarray:
        """`[..., A]` raw → regressed dims scaled, then the binary (gripper) dims in {0, 1}."""
        return self.action.normalize(action)

    def unnormalize_action(self, arm: np.ndarray, gripper: np.ndarray) -> np.ndarray:
        """Normalised regressed dims `[..., A-G]` and binary probabilities `[..., G]` → raw `[..., A]`."""
        return self.action.unnormalize(arm, gripper)

    def normalize_state(self, state: np.ndarray) -> np.ndarray:
        """`[..., S]` raw → regressed dims scaled, then the binary dims in {0, 1}, like the action's."""
        return self.state.normalize(state)
