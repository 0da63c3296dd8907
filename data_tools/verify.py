"""`python -m data_tools verify DATASET_DIR`: re-read every shard and check it against manifest.json.

Why: a dataset is usually written once and trained on for days, on many machines.
A truncated copy or a bad frame only shows up in training as skipped samples (or a
crash under `bad_sample_policy: fail`); this finds such problems up front, names the
shard and sample, and says what to change.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_tools.shards import error_text, iter_shard
from data_tools.upload import local_copy
from vla_scale.data.format import (
    IMAGE_EXTS,
    STAT_KEYS,
    FormatError,
    Manifest,
    decode_episode,
    decode_image,
    decode_vl,
    frame_name,
)
from vla_scale.data.locations import is_remote

REWRITE = "re-convert the dataset (or restore the shard from a good copy)"


@dataclass
class Problem:
    """One thing wrong with the dataset: where it is and what to do about it."""

    shard: str  # shard file name, or "-" for dataset-level problems
    key: str  # sample key, or "-"
    reason: str

    def __str__(self) -> str:
        return f"{self.shard}  {self.key}  {self.reason}"


@dataclass
class ShardReport:
    """What one shard actually holds (counted by a worker)."""

    path: str
    samples: int = 0
    frames: int = 0
    images: int = 0
    keys: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


@dataclass
class Report:
    """The whole verification result; `ok` when there are no problems."""

    folder: str
    kind: str = "?"
    shards: list[ShardReport] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    spaces: list[str] = field(default_factory=list)  # robot: the declared action/state spaces, described

    @property
    def ok(self) -> bool:
        return not self.problems


def _check_images(sample: dict, manifest: Manifest, skip: set[str]) -> tuple[int, list[str]]:
    """Decode every image member not in `skip` (also ones the format does not reference); returns (count, errors)."""
    count, errors = 0, []
    for name, data in sample.items():
        if name in skip or name.rsplit(".", 1)[-1] not in IMAGE_EXTS:
            continue
        count += 1
        try:
            img = decode_image(data)
        except FormatError as err:
            errors.append(f"{name}: {err}; {REWRITE}")
            continue
        errors += _size_errors(name, img, manifest)
    return count, errors


def _size_errors(name: str, img: np.ndarray, manifest: Manifest) -> list[str]:
    if manifest.image_size and list(img.shape[:2]) != list(manifest.image_size):
        return [f"{name}: image size {list(img.shape[:2])} != manifest image_size {manifest.image_size}"]
    return []


def _check_robot(sample: dict, manifest: Manifest) -> tuple[int, list[str], set[str]]:
    """Returns (frames, errors, names of the image members already decoded) for one episode."""
    try:
        ep = decode_episode(sample)
    except FormatError as err:
        return 0, [f"{err}; {REWRITE}"], set()
    errors = []
    if ep.action.ndim != 2 or ep.action.shape[1] != manifest.action_dim:
        errors.append(f"action shape {list(ep.action.shape)} does not match manifest action_dim {manifest.action_dim}")
    if ep.state.ndim != 2 or ep.state.shape[1] != manifest.state_dim:
        errors.append(f"state shape {list(ep.state.shape)} does not match manifest state_dim {manifest.state_dim}")
    if manifest.cameras and sorted(ep.frames) != sorted(manifest.cameras):
        errors.append(f"cameras {sorted(ep.frames)} != manifest cameras {sorted(manifest.cameras)}")
    meta = json.loads(sample["meta.json"])
    decoded = set()
    for cam, frames in ep.frames.items():
        for t, img in enumerate(frames):
            name = frame_name(meta, cam, t)
            decoded.add(name)
            errors += _size_errors(name, img, manifest)
    return ep.length, errors, decoded


def _check_vl(sample: dict, manifest: Manifest) -> tuple[list[str], set[str]]:
    """Returns (errors, names of the image members already decoded) for one VL sample."""
    try:
        vl = decode_vl(sample)
    except FormatError as err:
        return [f"{err}; {REWRITE}"], set()
    name = next(e for e in IMAGE_EXTS if e in sample)
    errors = _size_errors(name, vl.image, manifest)
    turns = vl.conversations
    if not isinstance(turns, list) or not turns or not all(isinstance(t, dict) and "value" in t for t in turns):
        errors.append("json 'conversations' must be a non-empty list of {'from': ..., 'value': ...} turns")
    return errors, {name}


def check_shard(folder: str, manifest: Manifest, path: str) -> ShardReport:
    """Read one shard and check each sample; runs in a worker process."""
    report = ShardReport(path)
    full = Path(folder) / path
    if not full.is_file():
        report.problems.append(Problem(path, "-", f"listed in manifest.json but {full} does not exist; {REWRITE}"))
        return report
    read_errors: list[str] = []
    for sample in iter_shard(full, lambda exn: read_errors.append(error_text(exn))):
        key = sample["__key__"]
        report.samples += 1
        report.keys.append(key)
        if manifest.kind == "robot":
            frames, errors, decoded = _check_robot(sample, manifest)
        else:
            frames, (errors, decoded) = 0, _check_vl(sample, manifest)
        images, image_errors = _check_images(sample, manifest, decoded)
        report.frames += frames
        report.images += images + len(decoded)
        if image_errors:  # decoding stopped at the first bad image; the image pass names every one
            errors = [e for e in errors if "undecodable image" not in e]
        report.problems += [Problem(path, key, reason) for reason in errors + image_errors]
    for reason in dict.fromkeys(read_errors):  # webdataset may report one failure at two levels
        report.problems.append(Problem(path, "-", f"tar read error ({reason}): shard truncated or corrupt; {REWRITE}"))
    return report


def _check_stats(folder: Path, manifest: Manifest) -> list[Problem]:
    path = folder / "stats.json"
    if not path.is_file():
        return [Problem("stats.json", "-", f"{path} is missing; run `python -m data_tools stats {folder}`")]
    fix = f"run `python -m data_tools stats {folder}` to rewrite it"
    try:
        raw = json.loads(path.read_text())
    except ValueError as err:
        return [Problem("stats.json", "-", f"not valid JSON ({err}); {fix}")]
    problems = []
    dims = {"action": manifest.action_dim, "state": manifest.state_dim}
    for name, dim in dims.items():
        for stat in STAT_KEYS:
            try:
                value = np.asarray(raw[name][stat], dtype=np.float64)
            except (KeyError, TypeError, ValueError):
                problems.append(Problem("stats.json", "-", f"{name}.{stat} is missing or not numeric; {fix}"))
                continue
            if value.shape != (dim,):
                problems.append(Problem("stats.json", "-", f"{name}.{stat} has shape {list(value.shape)}, not [{dim}]"))
            elif not np.isfinite(value).all():
                problems.append(Problem("stats.json", "-", f"{name}.{stat} holds NaN or infinite values; {fix}"))
    return problems


def _stray_shards(folder: Path, manifest: Manifest) -> list[Problem]:
    listed = {Path(s.path).as_posix() for s in manifest.shards}
    problems = []
    for path in sorted(folder.rglob("*.tar*")):
        rel = path.relative_to(folder).as_posix()
        if path.is_file() and rel not in listed:
            problems.append(
                Problem(rel, "-", "shard file not listed in manifest.json (left over from another write?); delete it")
            )
    return problems


def verify(folder: str | Path, workers: int = 1) -> Report:
    """Check a dataset folder (or an s3://, http(s)://, pipe: location); never raises for a bad dataset."""
    if is_remote(folder):  # fetched into a temporary folder with the readers' retries, then checked there
        try:
            with local_copy(folder) as local:
                report = verify(local, workers)
        except FormatError as err:
            report = Report(str(folder), problems=[Problem("-", "-", f"cannot fetch the dataset: {err}")])
        report.folder = str(folder)
        return report
    start = time.perf_counter()
    folder = Path(folder)
    report = Report(str(folder))
    try:
        manifest = Manifest.load(folder)
    except (FormatError, ValueError, TypeError, KeyError) as err:
        report.problems.append(Problem("manifest.json", "-", f"unreadable manifest: {err}"))
        return report
    report.kind = manifest.kind
    if manifest.kind not in ("robot", "vl"):
        report.problems.append(Problem("manifest.json", "-", f"kind {manifest.kind!r} is not 'robot' or 'vl'"))
        return report

    args = [(str(folder), manifest, s.path) for s in manifest.shards]
    if workers > 1 and len(args) > 1:
        with multiprocessing.Pool(min(workers, len(args))) as pool:
            report.shards = pool.starmap(check_shard, args)
    else:
        report.shards = [check_shard(*a) for a in args]

    for info, shard in zip(manifest.shards, report.shards, strict=True):
        report.problems += shard.problems
        if shard.samples != info.samples:
            report.problems.append(
                Problem(info.path, "-", f"holds {shard.samples} samples but manifest.json says {info.samples}")
            )
        if manifest.kind == "robot" and shard.frames != info.frames and not shard.problems:
            report.problems.append(
                Problem(info.path, "-", f"holds {shard.frames} frames but manifest.json says {info.frames}")
            )
    where: dict[str, list[str]] = {}
    for shard in report.shards:
        for key in shard.keys:
            where.setdefault(key, []).append(shard.path)
    for key, paths in where.items():
        if len(paths) > 1:
            counts = Counter(paths)
            places = ", ".join(f"{p} x{n}" if n > 1 else p for p, n in counts.items())
            report.problems.append(Problem(paths[0], key, f"duplicate sample key (in {places}); keys must be unique"))
    report.problems += _stray_shards(folder, manifest)
    if manifest.kind == "robot":
        report.problems += _check_stats(folder, manifest)
        report.spaces = manifest.robot_spaces.describe()
    report.seconds = time.perf_counter() - start
    return report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools verify`."""
    p = subparsers.add_parser(
        "verify",
        help="re-read every shard and check it against manifest.json and stats.json",
        description="Decode every sample of a dataset and check counts, dims, images, keys and stats.json. "
        "Exits 1 and lists (shard, key, reason) for every problem found.",
    )
    p.add_argument("dataset", metavar="DATASET", help="folder with manifest.json, or s3://, http(s)://, pipe: location")
    p.add_argument("--workers", type=int, default=1, help="processes checking shards (default: %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = verify(args.dataset, workers=max(1, args.workers))
    samples = sum(s.samples for s in report.shards)
    frames = sum(s.frames for s in report.shards)
    images = sum(s.images for s in report.shards)
    extra = f", {frames} frames" if report.kind == "robot" else ""
    print(
        f"{report.folder} ({report.kind}): {len(report.shards)} shards, {samples} samples{extra}, "
        f"{images} images read in {report.seconds:.1f} s"
    )
    if report.spaces:
        print("\n".join(report.spaces))
    if report.ok:
        print("OK: no problems found")
        return 0
    print(f"FAILED: {len(report.problems)} problem(s) (shard  key  reason):")
    for problem in report.problems:
        print(f"  {problem}")
    return 1
