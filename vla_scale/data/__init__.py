"""Data path: shard format, per-source streams, windowing, normalisation, mixing and collate.

Knows nothing of the model or the trainer; both consume its `Batch`.

The names below are imported on first use (PEP 562): `vla-scale prepare` and the data tools read manifests
through `vla_scale.data.format`, and importing this package must not cost them torch's import (~1 s per launch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vla_scale.data.batch import IGNORE_INDEX, Batch
    from vla_scale.data.loader import StreamSpec, StreamTracker, build_dataloader
    from vla_scale.data.observation import Observation

_WHERE = {
    "IGNORE_INDEX": "vla_scale.data.batch",
    "Batch": "vla_scale.data.batch",
    "Observation": "vla_scale.data.observation",
    "StreamSpec": "vla_scale.data.loader",
    "StreamTracker": "vla_scale.data.loader",
    "build_dataloader": "vla_scale.data.loader",
}
__all__ = ["IGNORE_INDEX", "Batch", "Observation", "StreamSpec", "StreamTracker", "build_dataloader"]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'vla_scale.data' has no attribute {name!r}")
    return getattr(importlib.import_module(_WHERE[name]), name)
