"""The action/state space a converter declares (`--binary-gripper-dims`, `--normalization`, ...), checked on the data.

A converter cannot know from the numbers alone which dimensions are open/close gripper commands, so it infers
nothing silently. Without a flag it keeps the layout vla_scale always assumed — the last action dimension is a
binary gripper, no state dimension is binarised — but only where the data agrees: a last action dimension
that takes values other than {0, 1} or {-1, 1} is refused with a message naming the flags, and the user
declares the space instead. `ShardWriter` checks every episode as it arrives (so a refusal comes early) and
resolves the declaration into the manifest's `Spaces` when it closes.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import numpy as np

from vla_scale.data.errors import FormatError
from vla_scale.data.spaces import ACTION_MODES, NORMALIZATIONS, Space, Spaces

BINARY_TOLERANCE = 1e-3  # a binary dimension's values lie this close to -1, 0 or 1
FLAGS = "--binary-gripper-dims I,J (which action dimensions are open/close commands) or --no-binary-gripper"


@dataclass(frozen=True)
class SpaceChoice:
    """What the command line says; `action_binary=None`: the last action dimension, if the data is binary."""

    action_binary: tuple[int, ...] | None = None
    state_binary: tuple[int, ...] = ()
    threshold: float | tuple[float, ...] | None = None  # None: 0.5 for {0, 1} data, 0 for {-1, 1}; or one per dim
    normalization: str = "mean_std"
    action_mode: str = "unspecified"
    action_names: tuple[str, ...] = ()
    state_names: tuple[str, ...] = ()

    def to_json(self) -> dict:
        """For the conversion fingerprint (a resume must declare the same space)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


@dataclass
class SpaceCheck:
    """The writer's running check of a `SpaceChoice` against every episode, and its resolution at close."""

    choice: SpaceChoice | Spaces
    # the values each binary dimension took (name -> dim -> values), for its convention: 0/1 or -1/1
    values: dict[str, dict[int, set[float]]] = field(default_factory=lambda: {"action": {}, "state": {}})
    # guessed layout: the values of the other action dims while they look binary too (dim -> values; None: not)
    others: dict[int, set[float] | None] = field(default_factory=dict)

    def binary_dims(self, name: str, dim: int) -> tuple[int, ...]:
        if isinstance(self.choice, Spaces):
            return getattr(self.choice, name).binary
        chosen = self.choice.action_binary if name == "action" else self.choice.state_binary
        return (dim - 1,) if chosen is None else chosen

    def check(self, key: str, action: np.ndarray, state: np.ndarray) -> None:
        """Refuse an episode the declaration cannot describe; remember the binary dimensions' values."""
        for name, arr in (("action", action), ("state", state)):
            dims = self.binary_dims(name, arr.shape[1])
            bad = [i for i in dims if not 0 <= i < arr.shape[1]]
            if bad:
                raise FormatError(f"sample {key}: binary {name} dimensions {bad} do not exist ({arr.shape[1]} dims)")
            values = arr[:, list(dims)]
            guessed = name == "action" and isinstance(self.choice, SpaceChoice) and self.choice.action_binary is None
            near = np.abs(values[..., None] - np.array([-1.0, 0.0, 1.0])).min(-1) <= BINARY_TOLERANCE
            if guessed and not near.all():
                raise FormatError(
                    f"sample {key}: the last action dimension takes values {values.min():.3g}..{values.max():.3g}, "
                    f"not only 0/1 or -1/1, so it is not a binary gripper command; declare the action space with "
                    f"{FLAGS} (a continuous gripper is then regressed like the other joints)"
                )
            if guessed:
                self._track_others(arr[:, :-1])
            for j, d in enumerate(dims):
                seen = self.values[name].setdefault(d, set())
                if near[:, j].all():
                    seen.update(np.unique(np.round(values[:, j])).tolist())
                else:
                    seen.add(0.5)  # not two-valued: keep the 0/1 convention and the threshold given

    def _track_others(self, action: np.ndarray) -> None:
        for d in range(action.shape[1]):
            seen = self.others.get(d, set())
            if seen is None:
                continue
            col = action[:, d]
            rounded = np.round(col)
            binary = np.abs(col - rounded).max(initial=0) <= BINARY_TOLERANCE and np.isin(rounded, (-1, 0, 1)).all()
            self.others[d] = seen | set(np.unique(rounded).tolist()) if binary else None

    def resolve(self, action_dim: int, state_dim: int) -> Spaces:
        """The declaration for the manifest, once every episode passed `check`."""
        if isinstance(self.choice, Spaces):
            if (self.choice.action.dim, self.choice.state.dim) != (action_dim, state_dim):
                raise FormatError(
                    f"declared spaces have {self.choice.action.dim} action / {self.choice.state.dim} state dims, "
                    f"the episodes {action_dim} / {state_dim}"
                )
            return self.choice
        choice = self.choice
        spaces = {}
        for name, dim, names in (("action", action_dim, choice.action_names), ("state", state_dim, choice.state_names)):
            dims = self.binary_dims(name, dim)
            seen = set().union(*(self.values[name].get(d, set()) for d in dims))
            if name == "action" and choice.action_binary is None:
                if {-1.0, 0.0} <= seen:
                    raise FormatError(
                        f"the last action dimension takes the values {sorted(seen)}; declare it with {FLAGS}"
                    )
                also = [d for d, v in sorted(self.others.items()) if v is not None and len(v) == 2]
                if also:
                    raise FormatError(
                        f"action dimensions {also} also switch between two values like a binary gripper (two arms?), "
                        f"so guessing only the last one could be wrong; declare them with {FLAGS}"
                    )
            # each binary dimension in its own convention: -1/1 (threshold 0) or 0/1 (threshold 0.5)
            signed = [bool(self.values[name].get(d)) and self.values[name][d] <= {-1.0, 1.0} for d in dims]
            guess = tuple(0.0 if sg else 0.5 for sg in signed)
            threshold = choice.threshold if choice.threshold is not None else _one_or_each(guess, 0.5)
            values = _one_or_each(tuple((-1.0, 1.0) if sg else (0.0, 1.0) for sg in signed), (0.0, 1.0))
            if isinstance(threshold, tuple) and len(threshold) != len(dims):
                if dims:
                    raise FormatError(
                        f"--gripper-threshold gives {len(threshold)} thresholds, the {name} has {len(dims)} binary "
                        f"dimensions {list(dims)}: give one number for all or one per binary dimension"
                    )
                threshold = 0.5  # no binary dimension here: unused
            spaces[name] = Space(dim, dims, threshold, values, names)
        return Spaces(spaces["action"], spaces["state"], choice.normalization, choice.action_mode)


def _one_or_each(each: tuple, default):
    """One value when every binary dimension has the same (the manifest stays as before), else one per dimension."""
    if not each:
        return default
    return each[0] if len(set(each)) == 1 else each


def _thresholds(text: str) -> float | tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("--gripper-threshold takes a number or comma-separated numbers") from None
    return values[0] if len(values) == 1 else values


def _dims(text: str, flag: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{flag} takes comma-separated dimension numbers, e.g. 6,13") from None


def add_space_args(p: argparse.ArgumentParser) -> None:
    """The flags that declare the action/state space (every robot converter but CALVIN, which knows its own)."""
    g = p.add_argument_group("action and state space (written into manifest.json; see README 'Datasets')")
    grip = g.add_mutually_exclusive_group()
    grip.add_argument(
        "--binary-gripper-dims",
        metavar="I,J",
        type=lambda s: _dims(s, "--binary-gripper-dims"),
        help="action dimensions that are binary open/close commands (trained with BCE; e.g. 6,13 for two arms). "
        "Default: the last one, if its values are only 0/1 or -1/1 (else the converter stops and asks)",
    )
    grip.add_argument(
        "--no-binary-gripper",
        action="store_true",
        help="no binary action dimension: every dimension (a continuous gripper too) is regressed",
    )
    g.add_argument(
        "--binary-state-dims",
        metavar="I,J",
        type=lambda s: _dims(s, "--binary-state-dims"),
        default=(),
        help="state dimensions to feed as binary (open/closed) instead of normalised values (default: none)",
    )
    g.add_argument(
        "--gripper-threshold",
        type=_thresholds,
        default=None,
        metavar="T[,T...]",
        help="a binary dimension counts as 1 above this; one number for all, or one per binary dimension in "
        "order (e.g. 0.5,0 for a 0/1 and a -1/1 gripper) (default: 0.5, or 0 when the values are -1/1)",
    )
    g.add_argument("--normalization", choices=NORMALIZATIONS, default="mean_std", help="(default: %(default)s)")
    g.add_argument(
        "--action-mode",
        choices=ACTION_MODES,
        default="unspecified",
        help="whether actions are absolute targets or relative (delta) commands; recorded (default: %(default)s)",
    )


def space_choice(
    args: argparse.Namespace, action_names: tuple[str, ...] = (), state_names: tuple[str, ...] = ()
) -> SpaceChoice:
    """The `SpaceChoice` of parsed `add_space_args` flags."""
    binary = () if args.no_binary_gripper else args.binary_gripper_dims
    return SpaceChoice(
        action_binary=None if binary is None else tuple(binary),
        state_binary=tuple(args.binary_state_dims),
        threshold=args.gripper_threshold,
        normalization=args.normalization,
        action_mode=args.action_mode,
        action_names=action_names,
        state_names=state_names,
    )
