"""Declared action and state spaces of a robot dataset: which dimensions are binary grippers, how the rest are scaled.

A robot dataset's `manifest.json` declares them under `"spaces"` (written by every converter):

    "spaces": {
      "normalization": "mean_std",          # or "min_max" / "q01_q99": both scale to [-1, 1] (q01_q99 clips)
      "action_mode": "relative",            # "absolute" / "relative" (deltas) / "unspecified": recorded only
      "action": {"binary": [6], "threshold": 0.5, "binary_values": [0.0, 1.0], "names": ["x", ..., "gripper"]},
      "state":  {"binary": [], "threshold": 0.5, "binary_values": [0.0, 1.0], "names": []}
    }

`threshold` is one number for every binary dimension or a list with one per binary dimension (in the order of
`binary`): two grippers recorded in different conventions (0/1 and -1/1) need 0.5 and 0; `binary_values` likewise
one [value for 0, value for 1] pair, or a list of pairs.

A *binary* dimension (an open/close gripper command) is trained as a 0/1 target (1 when the raw value is
above `threshold`) with a BCE logit, and a policy gives it back as `binary_values[0]` (target 0) or
`binary_values[1]` (target 1). Every other dimension is *regressed*: normalised by the dataset's
`normalization` from stats.json (mean/std, min/max or the 1st/99th percentiles) — a continuous gripper
(SO-100, ALOHA) is just a regressed dimension, perhaps named "gripper". Statistics come from the arrays
stored in the shards, which are exactly the arrays trained (relative actions are stored as deltas).

Batch contract: normalised arrays put the regressed dimensions first (in dataset order), then the binary
ones (`Space.order`); `Normalizer.unnormalize_action` puts them back in the dataset's order.

A manifest without the declaration (written before it existed) reads as the legacy layout: the last action
and the last state dimension binary at 0.5, mean/std; such datasets and their exported policies behave as
they always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vla_scale.data.errors import FormatError

NORMALIZATIONS = ("mean_std", "min_max", "q01_q99")
ACTION_MODES = ("absolute", "relative", "unspecified")


@dataclass(frozen=True)
class Space:
    """The layout of one array (`action` or `state`) of `dim` dimensions."""

    dim: int
    binary: tuple[int, ...] = ()  # binary gripper dimensions, ascending
    threshold: float | tuple[float, ...] = 0.5  # raw value > threshold → target 1; or one per binary dim
    binary_values: tuple = (0.0, 1.0)  # raw values a policy outputs for target 0 / 1; or one pair per binary dim
    names: tuple[str, ...] = ()  # one per dimension, or none

    def __post_init__(self) -> None:
        object.__setattr__(self, "binary", tuple(sorted(int(i) for i in self.binary)))
        pairs = [v for v in self.binary_values if isinstance(v, list | tuple)]
        if pairs:  # one (value for 0, value for 1) pair per binary dimension
            if (
                len(pairs) != len(self.binary_values)
                or len(pairs) != len(self.binary)
                or {len(p) for p in pairs} != {2}
            ):
                raise FormatError(
                    f"binary_values {list(self.binary_values)}: one [value for 0, value for 1] for all binary "
                    f"dimensions, or one such pair per binary dimension ({len(self.binary)})"
                )
            object.__setattr__(self, "binary_values", tuple((float(a), float(b)) for a, b in pairs))
        else:
            object.__setattr__(self, "binary_values", tuple(float(v) for v in self.binary_values))
        object.__setattr__(self, "names", tuple(str(n) for n in self.names))
        if isinstance(self.threshold, list | tuple):
            object.__setattr__(self, "threshold", tuple(float(t) for t in self.threshold))
            if len(self.threshold) != len(self.binary):
                raise FormatError(
                    f"{len(self.threshold)} thresholds for {len(self.binary)} binary dimensions {list(self.binary)}; "
                    "give one number for all or one per binary dimension"
                )
        else:
            object.__setattr__(self, "threshold", float(self.threshold))
        bad = [i for i in self.binary if not 0 <= i < self.dim]
        if bad or len(set(self.binary)) != len(self.binary):
            raise FormatError(f"binary dimensions {list(self.binary)} must be distinct and in 0..{self.dim - 1}")
        if self.names and len(self.names) != self.dim:
            raise FormatError(f"{len(self.names)} names for {self.dim} dimensions; give one per dimension or none")
        if not pairs and len(self.binary_values) != 2:
            raise FormatError(f"binary_values must be [value for 0, value for 1], got {list(self.binary_values)}")

    @property
    def regressed(self) -> tuple[int, ...]:
        """Dimensions that are normalised and regressed, in dataset order."""
        return tuple(i for i in range(self.dim) if i not in self.binary)

    @property
    def thresholds(self) -> tuple[float, ...]:
        """The threshold of each binary dimension, in the order of `binary`."""
        if isinstance(self.threshold, tuple):
            return self.threshold
        return (self.threshold,) * len(self.binary)

    @property
    def value_pairs(self) -> tuple[tuple[float, float], ...]:
        """(value for 0, value for 1) of each binary dimension, in the order of `binary`."""
        if self.binary_values and isinstance(self.binary_values[0], tuple):
            return self.binary_values  # type: ignore[return-value]
        return (tuple(self.binary_values),) * len(self.binary)  # type: ignore[return-value]

    @property
    def order(self) -> list[int]:
        """Dataset dimension at each position of the normalised array: regressed first, then binary."""
        return [*self.regressed, *self.binary]

    def to_json(self) -> dict:
        return {
            "binary": list(self.binary),
            "threshold": list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold,
            "binary_values": [list(v) if isinstance(v, tuple) else v for v in self.binary_values],
            "names": list(self.names),
        }

    @classmethod
    def from_json(cls, data: object, dim: int, where: str) -> Space:
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected an object with 'binary', 'threshold', 'names', got {data!r}")
        unknown = set(data) - {"binary", "threshold", "binary_values", "names"}
        if unknown:
            raise FormatError(f"{where}: unknown keys {sorted(unknown)}")
        try:
            return cls(
                dim,
                tuple(data.get("binary", ())),
                data.get("threshold", 0.5),
                tuple(data.get("binary_values", (0.0, 1.0))),
                tuple(data.get("names", ())),
            )
        except (TypeError, ValueError) as err:
            raise FormatError(f"{where}: {err}") from err

    def describe(self) -> str:
        """One line: which dimensions are regressed and which binary (with names where declared)."""

        def dims(idx: tuple[int, ...]) -> str:
            return ", ".join(f"{i} ({self.names[i]})" if self.names else str(i) for i in idx) or "none"

        line = f"{self.dim} dims; regressed: {dims(self.regressed)}; binary: {dims(self.binary)}"
        if self.binary and not isinstance(self.threshold, tuple) and not isinstance(self.binary_values[0], tuple):
            low, high = self.binary_values
            line += f" (> {self.threshold:g} → {high:g}, else {low:g})"
        elif self.binary:
            rules = (
                f"{d}: > {t:g} → {hi:g}, else {lo:g}"
                for d, t, (lo, hi) in zip(self.binary, self.thresholds, self.value_pairs, strict=True)
            )
            line += f" ({'; '.join(rules)})"
        return line


@dataclass(frozen=True)
class Spaces:
    """A robot dataset's declared action and state spaces and its normalisation mode."""

    action: Space
    state: Space
    normalization: str = "mean_std"
    action_mode: str = "unspecified"
    declared: bool = field(default=True, compare=False)  # False: a legacy manifest without "spaces"

    def __post_init__(self) -> None:
        if self.normalization not in NORMALIZATIONS:
            raise FormatError(f"normalization {self.normalization!r} is not one of {NORMALIZATIONS}")
        if self.action_mode not in ACTION_MODES:
            raise FormatError(f"action_mode {self.action_mode!r} is not one of {ACTION_MODES}")

    @classmethod
    def legacy(cls, action_dim: int, state_dim: int) -> Spaces:
        """What a manifest without a declaration means: last action and state dimension binary at 0.5, mean/std."""
        last = lambda dim: (dim - 1,) if dim > 0 else ()  # noqa: E731
        return cls(Space(action_dim, last(action_dim)), Space(state_dim, last(state_dim)), declared=False)

    @classmethod
    def from_json(cls, data: object, action_dim: int, state_dim: int, where: str = "spaces") -> Spaces:
        """The manifest's `spaces` object; empty or missing (None) → the legacy layout."""
        if not data:
            return cls.legacy(action_dim, state_dim)
        if not isinstance(data, dict):
            raise FormatError(f"{where}: expected an object, got {type(data).__name__}")
        unknown = set(data) - {"action", "state", "normalization", "action_mode"}
        if unknown:
            raise FormatError(f"{where}: unknown keys {sorted(unknown)}")
        return cls(
            Space.from_json(data.get("action", {}), action_dim, f"{where}.action"),
            Space.from_json(data.get("state", {}), state_dim, f"{where}.state"),
            str(data.get("normalization", "mean_std")),
            str(data.get("action_mode", "unspecified")),
        )

    def to_json(self) -> dict:
        """The manifest form; {} for a legacy layout, so re-saving a legacy manifest keeps it legacy."""
        if not self.declared:
            return {}
        return {
            "normalization": self.normalization,
            "action_mode": self.action_mode,
            "action": self.action.to_json(),
            "state": self.state.to_json(),
        }

    def model_dims(self) -> dict[str, int]:
        """`build_model` keywords: the array sizes and how many of their dimensions are binary."""
        return {
            "action_dim": self.action.dim,
            "state_dim": self.state.dim,
            "binary_dims": len(self.action.binary),
            "binary_state_dims": len(self.state.binary),
        }

    def describe(self) -> list[str]:
        """Lines for `inspect` / `verify`."""
        how = "declared" if self.declared else "not declared: legacy layout"
        return [
            f"spaces:      {how}; normalization {self.normalization}; actions {self.action_mode}",
            f"  action:    {self.action.describe()}",
            f"  state:     {self.state.describe()}",
        ]

    def difference(self, other: Spaces) -> str:
        """'' when datasets with these spaces can train one model together, else what differs (names and the
        action mode count only where both datasets declare them)."""
        diffs = []
        for name in ("action", "state"):
            a, b = getattr(self, name), getattr(other, name)
            if a.dim != b.dim:
                diffs.append(f"{name} dims {a.dim} vs {b.dim}")
            if a.binary != b.binary:
                diffs.append(f"{name} binary dims {list(a.binary)} vs {list(b.binary)}")
            if a.names and b.names and a.names != b.names:
                diffs.append(f"{name} names {list(a.names)} vs {list(b.names)}")
        if self.normalization != other.normalization:
            diffs.append(f"normalization {self.normalization} vs {other.normalization}")
        if "unspecified" not in (self.action_mode, other.action_mode) and self.action_mode != other.action_mode:
            diffs.append(f"action_mode {self.action_mode} vs {other.action_mode}")
        return "; ".join(diffs)
