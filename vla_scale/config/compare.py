"""Is this the same run? A stable hash of a resolved config and a readable diff between two.

`config_diff` leaves out the keys a resumed run may change (`RESUMABLE_CHANGES`): a longer schedule,
other logging and checkpoint cadence, Weights & Biases settings, the `eval:` section and the `debug:` drill hooks;
with `new_keys_at_default`, also the keys a newer vla_scale added to the schema, as long as they keep their default
(a run started before the key existed resumes after an upgrade; one that sets it otherwise is another run).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

from vla_scale.config.schema import Config

# Keys (or whole sections) that may differ when a run directory is reused: resume with a longer
# schedule, new logging or checkpoint cadence, another W&B target, other evaluation settings, or a drill hook
# switched off.
RESUMABLE_CHANGES = (
    "train.max_steps",
    "train.log_every",
    "train.ckpt_every",
    "train.keep_last",
    "train.preempt_signal",
    "train.process_group_timeout_s",  # per process: no saved state depends on it
    "wandb",
    "eval",
    "debug",
)

_ABSENT = object()  # a key only one side has


def _tree(cfg: Config | dict) -> dict:
    """Plain JSON-like data (tuples as lists), as a saved config.yaml reads back."""
    return json.loads(json.dumps(cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)))


def config_hash(cfg: Config | dict) -> str:
    """Stable short hash of the whole resolved config (every key, resumable ones included); stored in checkpoints."""
    blob = json.dumps(_tree(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _walk(old: Any, new: Any, key: str, out: list[tuple[str, Any, Any]]) -> None:
    """Collect (key, old, new) for each differing leaf; lists go item by item, as overrides address them."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in [*old, *(k for k in new if k not in old)]:
            _walk(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}" if key else str(k), out)
    elif isinstance(old, list) and isinstance(new, list) and old and new:
        for i in range(max(len(old), len(new))):
            _walk(old[i] if i < len(old) else _ABSENT, new[i] if i < len(new) else _ABSENT, f"{key}.{i}", out)
    elif old != new:
        out.append((key, old, new))


def _ignored(key: str, ignore: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in ignore)


def config_diff(
    a: Config | dict, b: Config | dict, ignore: Sequence[str] = RESUMABLE_CHANGES, new_keys_at_default: bool = False
) -> list[str]:
    """`"key: old -> new"` for every key whose value differs from `a` to `b`, minus the keys under `ignore`, and
    with `new_keys_at_default` minus the keys `a` lacks that hold their schema default in `b`.

    Accepts `Config` objects or their `to_dict` trees (e.g. a saved config.yaml read as YAML); pass
    `ignore=()` to compare everything (e.g. two nodes that must start the very same run).
    """
    found: list[tuple[str, Any, Any]] = []
    _walk(_tree(a), _tree(b), "", found)
    if new_keys_at_default:
        defaults = _tree(Config())
        found = [(k, old, new) for k, old, new in found if not (old is _ABSENT and _at(defaults, k) == new)]
    return [f"{key}: {_show(old)} -> {_show(new)}" for key, old, new in found if not _ignored(key, ignore)]


def _at(tree: Any, key: str) -> Any:
    """The value at dotted `key` in `tree`; `_ABSENT` where there is none (also inside lists: items have no
    default in the schema's tree)."""
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return _ABSENT
        tree = tree[part]
    return tree


def _show(value: Any) -> str:
    return "(absent)" if value is _ABSENT else repr(value)
