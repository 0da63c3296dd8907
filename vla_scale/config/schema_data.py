"""`data:` — which datasets feed the run and how their shards become batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vla_scale.config.errors import ConfigError, check_at_least


@dataclass
class SourceConfig:
    """One dataset (a folder with manifest.json, stats.json and shards) and its mixing weight."""

    path: str = ""
    weight: float = 1.0

    def validate(self, prefix: str) -> None:
        if not self.path:
            raise ConfigError(f"{prefix}.path is empty")
        if self.weight < 0:
            raise ConfigError(f"{prefix}.weight must be >= 0, got {self.weight}")


@dataclass
class AugmentConfig:
    """Robot-frame augmentation; one draw per camera per window, shared by the window's frames."""

    enabled: bool = False
    crop: Literal["none", "shift", "resized_crop"] = "shift"
    shift_px: int = 4  # shift: edge-pad by this many pixels, crop back at a random offset
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # resized_crop: area fraction range
    brightness: float = 0.2  # colour jitter strengths; 0 turns each off
    contrast: float = 0.2
    saturation: float = 0.2

    def validate(self, prefix: str = "data.augment") -> None:
        low_high = self.crop_scale
        if len(low_high) != 2 or not 0 < low_high[0] <= low_high[1] <= 1:
            raise ConfigError(f"{prefix}.crop_scale must be [low, high] with 0 < low <= high <= 1, got {low_high}")
        check_at_least(self, prefix, ("shift_px", "brightness", "contrast", "saturation"), 0)


@dataclass
class StorageConfig:
    """Datasets in object storage or behind HTTP (`s3://`, `http(s)://`, `pipe:` paths): cache and retries.

    Shards are streamed into `cache_dir` (shared by the node's readers), kept under `cache_limit_gb` by
    evicting the least recently used; up to `fetch_threads` fetches at a time per process (in its fetch process,
    or on its threads when `fetch_process` is false) bring, for every reader, `read_ahead` shards beyond the one it
    reads, more (up to `read_ahead_max`) for a reader whose shards are read faster than fetched.
    """

    cache_dir: str = ""  # "" = $VLA_SCALE_CACHE_DIR, else ~/.cache/vla_scale/shards
    cache_limit_gb: float = 20.0
    read_ahead: int = 2  # shards fetched ahead per reader (0: fetch each when it is reached)
    read_ahead_max: int = 8  # a reader's read-ahead grows up to this while fetching is slower than reading
    fetch_threads: int = 8  # fetches at a time per process, shared by all its readers and sources
    fetch_process: bool = True  # downloads run in a helper process (their CPU off the reader's GIL); false: threads
    retries: int = 5  # retries of a transient failure (HTTP 5xx/429, dropped connection, timeout)
    backoff_s: float = 0.5  # first retry delay, doubled at each retry
    timeout_s: float = 60.0  # connect/read timeout per request

    def validate(self, prefix: str = "data.storage") -> None:
        if self.cache_limit_gb <= 0:
            raise ConfigError(
                f"{prefix}.cache_limit_gb must be > 0 (the shard cache size in GB), got {self.cache_limit_gb}"
            )
        check_at_least(self, prefix, ("read_ahead", "read_ahead_max", "retries", "backoff_s"), 0)
        check_at_least(self, prefix, ("fetch_threads",), 1)
        if self.timeout_s <= 0:
            raise ConfigError(f"{prefix}.timeout_s must be > 0 seconds, got {self.timeout_s}")


@dataclass
class DataConfig:
    """How shards become batches: windowing, mixing, workers and the bad-sample policy."""

    sources: list[SourceConfig] = field(default_factory=list)
    window_size: int = 1  # frames of history per training sample
    fwd_pred_next_n: int = 1  # action chunk length predicted at each frame
    num_workers: int = 1  # DataLoader workers per rank
    prefetch_factor: int = 2
    shuffle_buffer: int = 64  # windows held for shuffling, per worker
    shard_shuffle: bool = True
    max_text_len: int = 48  # token budget for instructions and VL conversations
    bad_sample_policy: Literal["skip", "fail"] = "skip"
    # skip policy: stop the run once a source's reader meets this many bad samples/windows in a row (all of a
    # source unusable would otherwise never end); far above one broken episode's windows
    max_bad_in_a_row: int = 10_000
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # World-size-independent order: resumable on another number of ranks (vla_scale/data/elastic.py)
    elastic: bool = False
    storage: StorageConfig = field(default_factory=StorageConfig)

    def validate(self, prefix: str = "data") -> None:
        """Sources, window sizes and augmentation; whether the folders hold datasets is checked by `prepare`."""
        if not self.sources:
            raise ConfigError(f"{prefix}.sources is empty: list at least one dataset folder with a manifest.json")
        for i, src in enumerate(self.sources):
            src.validate(f"{prefix}.sources.{i}")
        if sum(s.weight for s in self.sources) <= 0:
            raise ConfigError(f"{prefix}.sources: at least one weight must be > 0")
        check_at_least(
            self, prefix, ("window_size", "fwd_pred_next_n", "max_text_len", "shuffle_buffer", "max_bad_in_a_row"), 1
        )
        self.augment.validate(f"{prefix}.augment")
        self.storage.validate(f"{prefix}.storage")
        check_at_least(self, prefix, ("num_workers",), 0)
