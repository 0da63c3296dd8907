"""The driver every converter shares: sources in, resumable shards out.

A format module only lists its episodes as cheap picklable *sources* and provides a
`load(source) -> Episode` function. This module runs `load` in worker processes
(`Pool.imap`, so output order, and hence every shard byte, is the same for any worker
count), writes through `ShardWriter`, and makes the run resumable: after each finished
shard, `convert_progress.json` records the shards so far and how many episodes they
hold. Shards are cut by count or size only, so a rerun with `--resume` that keeps those
shards and restarts at the next episode writes exactly what an uninterrupted run would.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from tqdm import tqdm

from data_tools.writer import ShardWriter
from vla_scale.data.format import Episode, Manifest, ShardInfo, encode_episode

PROGRESS_FILE = "convert_progress.json"
PROGRESS_VERSION = 1


@dataclass
class ConvertOptions:
    """The options every converter shares (see `add_common_args`)."""

    src: str
    out: str
    workers: int = 1
    episodes_per_shard: int | None = None
    shard_size_mb: float = 256.0
    image_ext: str = "jpg"
    overwrite: bool = False
    resume: bool = False
    limit: int | None = None
    progress: bool = True
    cameras: list[str] = field(default_factory=list)  # NAME=SOURCE_KEY, as given on the command line

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConvertOptions:
        return cls(
            src=args.src,
            out=args.out,
            workers=args.workers,
            episodes_per_shard=args.episodes_per_shard,
            shard_size_mb=args.shard_size_mb,
            image_ext=args.image_ext,
            overwrite=args.overwrite,
            resume=args.resume,
            limit=args.limit,
            cameras=list(args.camera or []),
        )


def add_common_args(p: argparse.ArgumentParser) -> None:
    """SRC, OUT and the options every converter takes."""
    p.add_argument("src", metavar="SRC", help="source dataset folder")
    p.add_argument("out", metavar="OUT", help="output folder for the vla_scale shards")
    p.add_argument("--workers", type=int, default=1, help="loader processes (default: %(default)s)")
    p.add_argument(
        "--shard-size-mb", type=float, default=256.0, help="start a new shard after this size (default: %(default)s)"
    )
    p.add_argument("--episodes-per-shard", type=int, default=None, help="start a new shard after N episodes instead")
    p.add_argument("--image-ext", choices=("jpg", "png", "webp"), default="jpg", help="(default: %(default)s)")
    p.add_argument(
        "--camera",
        action="append",
        metavar="NAME=SOURCE_KEY",
        help="map a source image key to an output camera (repeatable; static camera: rgb_static, wrist: rgb_wrist)",
    )
    p.add_argument("--limit", type=int, default=None, help="convert only the first N episodes (for a quick look)")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace a dataset already in OUT")
    group.add_argument("--resume", action="store_true", help="continue an interrupted conversion into OUT")


def parse_cameras(specs: Sequence[str], default: dict[str, str]) -> dict[str, str]:
    """`["rgb_static=observation.image"]` → `{"rgb_static": "observation.image"}`; `default` when empty."""
    if not specs:
        return dict(default)
    cameras: dict[str, str] = {}
    for spec in specs:
        name, sep, key = spec.partition("=")
        if not sep or not name or not key or "." in name or "/" in name:
            raise ValueError(
                f"--camera {spec!r}: write NAME=SOURCE_KEY with a NAME without '.' or '/', "
                "e.g. --camera rgb_static=observation.images.top"
            )
        if name in cameras:
            raise ValueError(f"--camera {name} is given twice; give each output camera once")
        cameras[name] = key
    return cameras


def _encoded(source: Any, load: Callable[[Any], Episode], image_ext: str) -> dict:
    """Worker side: load and compress one episode, so the parent only writes bytes."""
    return encode_episode(load(source), image_ext)


def _read_progress(out: Path, fingerprint: dict) -> tuple[list[ShardInfo], int]:
    """Shards already finished and episodes they hold, from an interrupted run with the same settings."""
    path = out / PROGRESS_FILE
    if not path.is_file():
        return [], 0
    data = json.loads(path.read_text())
    if data.get("version") != PROGRESS_VERSION or data.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path} was written by a conversion with other settings ({data.get('fingerprint')}); "
            "rerun with the same source and options, or with --overwrite to start over"
        )
    return [ShardInfo(**s) for s in data["shards"]], int(data["episodes_done"])


def _write_progress(out: Path, fingerprint: dict, shards: list[ShardInfo], episodes_done: int) -> None:
    data = {
        "version": PROGRESS_VERSION,
        "fingerprint": fingerprint,
        "episodes_done": episodes_done,
        "shards": [asdict(s) for s in shards],
    }
    tmp = out / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out / PROGRESS_FILE)


def convert(
    sources: Sequence[Any],
    load: Callable[[Any], Episode],
    opts: ConvertOptions,
    name: str,
    settings: dict,
    extra: dict | None = None,
) -> Manifest:
    """Write the episodes `load(s)` for `s` in `sources` into `opts.out`; returns the manifest.

    `load` must be picklable (a module-level function or a `functools.partial` of one).
    `settings` (JSON-able: the format and its key/camera options) goes into the progress
    file, so `--resume` refuses to continue a run made with other settings.
    """
    if opts.workers < 1:
        raise ValueError(f"--workers must be >= 1, not {opts.workers}")
    if opts.limit is not None:
        if opts.limit < 1:
            raise ValueError(f"--limit must be >= 1, not {opts.limit}")
        sources = sources[: opts.limit]
    if not sources:
        raise ValueError(f"{opts.src}: no episodes found to convert; check SRC and --split")
    out = Path(opts.out)
    max_bytes = None if opts.episodes_per_shard else int(opts.shard_size_mb * 2**20)
    fingerprint = {  # compared with the JSON copy in the progress file, so made JSON-shaped
        "name": name,
        "src": str(Path(opts.src).resolve()),
        "image_ext": opts.image_ext,
        "episodes_per_shard": opts.episodes_per_shard,
        "max_bytes": max_bytes,
        "settings": settings,
    }
    fingerprint = json.loads(json.dumps(fingerprint))

    kept: list[ShardInfo] | None = None
    start = 0
    if opts.resume:
        if (out / "manifest.json").is_file() and not (out / PROGRESS_FILE).is_file():
            return Manifest.load(out)  # already complete
        kept, start = _read_progress(out, fingerprint)
        if start > len(sources):
            raise ValueError(f"{out}: {start} episodes are done but only {len(sources)} are asked for; raise --limit")
    elif opts.overwrite:
        (out / PROGRESS_FILE).unlink(missing_ok=True)

    writer = ShardWriter(
        out,
        name,
        "robot",
        max_samples=opts.episodes_per_shard,
        max_bytes=max_bytes,
        image_ext=opts.image_ext,
        extra={"source_format": settings.get("format", ""), "source": str(opts.src), **(extra or {})},
        overwrite=opts.overwrite,
        resume=kept,
    )
    fn = partial(_encoded, load=load, image_ext=opts.image_ext)
    todo = sources[start:]
    pool = multiprocessing.Pool(opts.workers) if opts.workers > 1 else None
    try:
        samples: Iterator[dict] = pool.imap(fn, todo, chunksize=1) if pool is not None else map(fn, todo)
        with writer:
            bar = tqdm(samples, total=len(sources), initial=start, desc=f"convert {name}", disable=not opts.progress)
            for i, sample in enumerate(bar, start=start):
                before = len(writer.shards)
                writer.write_sample(sample)
                if len(writer.shards) > before:
                    _write_progress(out, fingerprint, writer.shards, i + 1)
        manifest = writer.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return manifest


def report(manifest: Manifest, out: str) -> None:
    frames = sum(s.frames for s in manifest.shards)
    print(f"{out}: {manifest.num_samples} episodes, {frames} frames in {len(manifest.shards)} shards")
