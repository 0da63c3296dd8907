"""Data path: shard format, per-source streams, windowing, normalisation, mixing and collate.

Knows nothing of the model or the trainer; both consume its `Batch`.
"""

from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.loader import StreamSpec, StreamTracker, build_dataloader
from vla_scale.data.observation import Observation

__all__ = ["IGNORE_INDEX", "Batch", "Observation", "StreamSpec", "StreamTracker", "build_dataloader"]
