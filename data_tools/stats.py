"""`python -m data_tools stats DATASET_DIR [--check]`: recompute stats.json from the shards.

Why: training normalises actions and states with stats.json, so it must describe the
shards exactly. After shards are edited, merged or copied from elsewhere, this rewrites
it from what is on disk; `--check` tells whether an existing file is still right.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from data_tools.shards import iter_dataset
from vla_scale.data.format import STAT_KEYS, FormatError, Manifest, compute_stats, decode_npy

TOLERANCE = 1e-5
Stats = dict[str, dict[str, list[float]]]


def recompute_stats(folder: str | Path) -> Stats:
    """`{"action": {...}, "state": {...}}` over every frame of every episode (only the arrays are read)."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    if manifest.kind != "robot":
        raise FormatError(f"{folder} is a {manifest.kind} dataset; stats.json exists only for robot datasets")
    arrays: dict[str, list[np.ndarray]] = {"action": [], "state": []}
    for shard, sample in iter_dataset(folder, manifest):
        for name, found in arrays.items():
            if f"{name}.npy" not in sample:
                raise FormatError(f"{shard}: sample {sample['__key__']} has no {name}.npy; run data_tools verify")
            value = decode_npy(sample[f"{name}.npy"]).astype(np.float32)
            if value.ndim != 2 or not np.isfinite(value).all():
                raise FormatError(
                    f"{shard}: sample {sample['__key__']} {name}.npy is not a finite [L, D] array; "
                    f"run `python -m data_tools verify {folder}` and fix the dataset first"
                )
            found.append(value)
    if not arrays["action"]:
        raise FormatError(f"{folder}: the shards hold no episodes; nothing to compute")
    return {name: compute_stats(found) for name, found in arrays.items()}


def write_stats(folder: str | Path, stats: Stats) -> Path:
    """Write stats.json atomically (tmp file + rename), in the same layout as ShardWriter."""
    path = Path(folder) / "stats.json"
    tmp = path.with_name("stats.json.tmp")
    tmp.write_text(json.dumps(stats, indent=2))
    tmp.replace(path)
    return path


def compare_stats(existing: dict, fresh: Stats, tolerance: float = TOLERANCE) -> list[str]:
    """Differences beyond `tolerance` (absolute, or relative for large values), one line each."""
    diffs = []
    for name, table in fresh.items():
        for stat in STAT_KEYS:
            new = np.asarray(table[stat], dtype=np.float64)
            try:
                old = np.asarray(existing[name][stat], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                diffs.append(f"{name}.{stat}: missing or not numeric in stats.json")
                continue
            if old.shape != new.shape:
                diffs.append(f"{name}.{stat}: {old.shape[0] if old.ndim else 0} values, shards give {new.shape[0]}")
                continue
            bad = ~np.isclose(old, new, rtol=tolerance, atol=tolerance)
            for i in np.flatnonzero(bad):
                diffs.append(f"{name}.{stat}[{i}]: stats.json has {old[i]:.6g}, shards give {new[i]:.6g}")
    return diffs


def format_table(stats: Stats) -> str:
    """One row per array dimension, one column per statistic."""
    head = f"{'array':<8}{'dim':>4}" + "".join(f"{s:>12}" for s in STAT_KEYS)
    rows = [head, "-" * len(head)]
    for name, table in stats.items():
        for d in range(len(table["mean"])):
            rows.append(f"{name:<8}{d:>4}" + "".join(f"{table[s][d]:>12.5g}" for s in STAT_KEYS))
    return "\n".join(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools stats`."""
    p = subparsers.add_parser(
        "stats",
        help="recompute stats.json of a robot dataset from its shards (or --check it)",
        description="Recompute per-dimension mean, std, min, max, q01 and q99 of action and state "
        "and write stats.json atomically.",
    )
    p.add_argument("dataset", metavar="DATASET_DIR", help="robot dataset folder with manifest.json")
    p.add_argument(
        "--check",
        action="store_true",
        help=f"do not write; exit 1 if stats.json differs from the shards by more than {TOLERANCE:g}",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    folder = Path(args.dataset)
    fresh = recompute_stats(folder)
    print(format_table(fresh))
    if not args.check:
        print(f"wrote {write_stats(folder, fresh)}")
        return 0
    path = folder / "stats.json"
    if not path.is_file():
        print(f"FAILED: {path} is missing; run `python -m data_tools stats {folder}` to write it")
        return 1
    try:
        existing = json.loads(path.read_text())
    except ValueError as err:
        print(f"FAILED: {path} is not valid JSON ({err}); run `python -m data_tools stats {folder}` to rewrite it")
        return 1
    diffs = compare_stats(existing, fresh)
    if diffs:
        print(f"FAILED: {path} differs from the shards in {len(diffs)} value(s):")
        print("\n".join(f"  {d}" for d in diffs))
        print(f"run `python -m data_tools stats {folder}` to rewrite it")
        return 1
    print(f"OK: {path} matches the shards (tolerance {TOLERANCE:g})")
    return 0
