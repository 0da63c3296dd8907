"""What the prepare step checks in the robot datasets before launch: weights, stats.json and episode lengths.

Everything here reads only `manifest.json` and `stats.json` (no shard is opened), so it costs
milliseconds however large the dataset is. Without these checks each case below fails, or trains
on nothing, inside the ranks: a zero-weight source is never drawn, a NaN std makes every target
NaN, and a window longer than every episode of a source leaves its readers with no sample.
"""

from __future__ import annotations

from vla_scale.config import Config, ConfigError
from vla_scale.data.format import FormatError, Manifest, load_stats
from vla_scale.data.normalize import MIN_STD, constant_dims

RESTAT = "recompute it with `python -m data_tools stats`"


def check_robot_sources(cfg: Config, manifests: list[Manifest]) -> list[str]:
    """Raise ConfigError for a robot source that cannot train as configured; return notes for what prepare reports.

    `manifests` are the sources' manifests, in `data.sources` order.
    """
    notes: list[str] = []
    longest: dict[int, tuple[int, bool]] = {}  # source index -> (longest episode, exact or an upper bound)
    for i, (src, manifest) in enumerate(zip(cfg.data.sources, manifests, strict=True)):
        if manifest.kind != "robot":
            continue
        key = f"data.sources.{i}"
        if src.weight == 0:
            raise ConfigError(
                f"{key}.weight is 0: the robot dataset {src.path} would never be drawn, so the run would not train "
                f"on it; remove it from data.sources instead (or give it a weight > 0)"
            )
        if not manifest.shards:
            raise ConfigError(f"{key}.path: {src.path}/manifest.json lists no shards; re-convert the dataset")
        notes += _check_stats(key, src.path, manifest)
        exact = all(shard.max_length for shard in manifest.shards)
        longest[i] = (max(shard.longest_episode() for shard in manifest.shards), exact)
    window = cfg.data.window_size
    for i, (steps, exact) in longest.items():
        if window > steps:
            raise ConfigError(
                f"data.window_size ({window}) is longer than every episode of data.sources.{i} "
                f"({cfg.data.sources[i].path}: the longest has {'' if exact else 'at most '}{steps} steps), so that "
                f"source has no training window; set data.window_size to at most {steps} or remove the source"
            )
    chunk = cfg.data.fwd_pred_next_n
    if longest and chunk > max(steps for steps, _ in longest.values()):
        steps, exact = max(longest.values())
        raise ConfigError(
            f"data.fwd_pred_next_n ({chunk}) is longer than every episode of the robot sources (the longest has "
            f"{'' if exact else 'at most '}{steps} steps): every action chunk would run past its episode's end and "
            f"be mostly padding; set data.fwd_pred_next_n to at most {steps}"
        )
    return notes


def _check_stats(key: str, path: str, manifest: Manifest) -> list[str]:
    """stats.json must be finite and match the manifest's dimensions; constant dimensions are reported."""
    try:
        stats = load_stats(path)
    except FormatError as err:
        raise ConfigError(f"{key}.path: {err}") from err
    for name, dim in (("action", manifest.action_dim), ("state", manifest.state_dim)):
        found = len(stats[name]["std"])
        if dim and found != dim:
            raise ConfigError(
                f"{key}.path: {path}/stats.json has {found} {name} dimensions but manifest.json says {dim}; {RESTAT}"
            )
    return [
        f"{key} ({path}): {name} dimension(s) {dims} are constant in stats.json (std < {MIN_STD:g}); they are "
        "normalised with std 1 (to 0 on this data) instead of being divided by ~0"
        for name, dims in constant_dims(stats, manifest.robot_spaces).items()
        if dims
    ]
