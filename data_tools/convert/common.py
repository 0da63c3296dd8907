"""The driver every converter shares: sources in, resumable shards out.

A format module only lists its episodes as cheap picklable *sources* and provides a
`load(source) -> Episode` function. This module runs `load` in worker processes
(`Pool.imap`, so output order, and hence every shard byte, is the same for any worker
count), writes through `ShardWriter`, and makes the run resumable: after each finished
shard, `convert_progress.json` records the shards so far and how many episodes they
hold. Shards are cut by count or size only, so a rerun with `--resume` that keeps those
shards and restarts at the next episode writes exactly what an uninterrupted run would.

`load` returns an `Episode` (robot datasets; or a list of them, when one source holds
several, e.g. a LeRobot episode split where its task changes) or a `VLSample` (kind "vl"), or raises
`SkipSample` for a source that should be left out and counted (e.g. a missing image);
the count and the first reasons go into the manifest's `extra["skipped"]`.
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
from typing import Any, Literal

from tqdm import tqdm

from data_tools.space_choice import SpaceChoice
from data_tools.writer import ShardWriter
from vla_scale.data.format import (
    IMAGE_ENCODINGS,
    JPEG_QUALITY,
    Episode,
    Manifest,
    ShardInfo,
    Spaces,
    VLSample,
    encode_episode,
    encode_vl,
)

PROGRESS_FILE = "convert_progress.json"
PROGRESS_VERSION = 1
SKIP_EXAMPLES = 10  # skip reasons kept in the manifest; the rest are only counted


Loaded = Episode | VLSample | list[Episode]  # what a converter's `load` returns for one source


class SkipSample(Exception):
    """Raised by a `load` function for a source to leave out; the message says why."""


@dataclass
class ConvertOptions:
    """The options every converter shares (see `add_common_args`)."""

    src: str
    out: str
    workers: int = 1
    episodes_per_shard: int | None = None
    shard_size_mb: float = 256.0
    image_ext: str = "auto"
    jpeg_quality: int = JPEG_QUALITY
    overwrite: bool = False
    resume: bool = False
    limit: int | None = None
    progress: bool = True
    cameras: list[str] = field(default_factory=list)  # NAME=SOURCE_KEY, as given on the command line
    start_method: str | None = None  # worker pool's multiprocessing start method (None: the platform default)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConvertOptions:
        return cls(
            src=args.src,
            out=args.out,
            workers=args.workers,
            episodes_per_shard=args.episodes_per_shard,
            shard_size_mb=args.shard_size_mb,
            image_ext=args.image_ext,
            jpeg_quality=args.jpeg_quality,
            overwrite=args.overwrite,
            resume=args.resume,
            limit=args.limit,
            cameras=list(getattr(args, "camera", None) or []),
        )


IMAGE_HELP = (
    "how frames are stored. auto (default): frames that arrive as JPEG/PNG/WebP files (RLDS images, LeRobot "
    "image columns, ALOHA JPEG rows, LLaVA images) are copied byte for byte, pixels (video, arrays) are stored "
    "as lossless PNG; jpg: source JPEG bytes copied, everything else encoded as JPEG 4:4:4 at --jpeg-quality "
    "(smaller, lossy); png: everything lossless PNG (source JPEGs decoded once, stored exactly as decoded); "
    "webp: lossy WebP at --jpeg-quality. The manifest records each camera's encoding (image_encoding)"
)


def add_common_args(p: argparse.ArgumentParser, robot: bool = True) -> None:
    """SRC, OUT and the options every converter takes (`robot=False`: no --camera, "samples" in the help)."""
    unit = "episodes" if robot else "samples"
    p.add_argument("src", metavar="SRC", help="source dataset (folder or file)")
    p.add_argument("out", metavar="OUT", help="output folder for the vla_scale shards")
    p.add_argument("--workers", type=int, default=1, help="loader processes (default: %(default)s)")
    p.add_argument(
        "--shard-size-mb", type=float, default=256.0, help="start a new shard after this size (default: %(default)s)"
    )
    p.add_argument("--episodes-per-shard", type=int, default=None, help=f"start a new shard after N {unit} instead")
    p.add_argument("--image-ext", choices=IMAGE_ENCODINGS, default="auto", help=IMAGE_HELP)
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=JPEG_QUALITY,
        help="quality of JPEG (and WebP) frames encoded from pixels (default: %(default)s)",
    )
    if robot:
        p.add_argument(
            "--camera",
            action="append",
            metavar="NAME=SOURCE_KEY",
            help="map a source image key to an output camera (repeatable; static camera: rgb_static, wrist: rgb_wrist)",
        )
    p.add_argument("--limit", type=int, default=None, help=f"convert only the first N {unit} (for a quick look)")
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


def _encoded(
    source: Any, load: Callable[[Any], Loaded], image_ext: str, quality: int = JPEG_QUALITY
) -> list[dict] | str:
    """Worker side: load and compress one source's samples, so the parent only writes bytes; a str is a skip reason."""
    try:
        loaded = load(source)
    except SkipSample as err:
        return str(err)
    items = loaded if isinstance(loaded, list) else [loaded]
    return [
        encode_vl(item, image_ext, quality) if isinstance(item, VLSample) else encode_episode(item, image_ext, quality)
        for item in items
    ]


@dataclass
class Skipped:
    """Sources left out so far: how many, and the first reasons (kept small for huge datasets)."""

    count: int = 0
    first: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.first) < SKIP_EXAMPLES:
            self.first.append(reason)


def _read_progress(out: Path, fingerprint: dict) -> tuple[list[ShardInfo], int, Skipped]:
    """Shards already finished, sources they cover and skips so far, from an interrupted run with the same settings."""
    path = out / PROGRESS_FILE
    if not path.is_file():
        return [], 0, Skipped()
    data = json.loads(path.read_text())
    if data.get("version") != PROGRESS_VERSION or data.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{path} was written by a conversion with other settings ({data.get('fingerprint')}); "
            "rerun with the same source and options, or with --overwrite to start over"
        )
    skipped = Skipped(**data.get("skipped", {}))
    return [ShardInfo(**s) for s in data["shards"]], int(data["episodes_done"]), skipped


def _write_progress(
    out: Path, fingerprint: dict, shards: list[ShardInfo], episodes_done: int, skipped: Skipped
) -> None:
    data = {
        "version": PROGRESS_VERSION,
        "fingerprint": fingerprint,
        "episodes_done": episodes_done,  # sources consumed (written or skipped), not samples
        "shards": [asdict(s) for s in shards],
        "skipped": asdict(skipped),
    }
    tmp = out / (PROGRESS_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, out / PROGRESS_FILE)


def convert(
    sources: Sequence[Any],
    load: Callable[[Any], Loaded],
    opts: ConvertOptions,
    name: str,
    settings: dict,
    extra: dict | None = None,
    kind: Literal["robot", "vl"] = "robot",
    spaces: Spaces | SpaceChoice | None = None,
) -> Manifest:
    """Write the samples `load(s)` for `s` in `sources` into `opts.out`; returns the manifest.

    `load` must be picklable (a module-level function or a `functools.partial` of one);
    it returns Episodes for `kind="robot"` and VLSamples for `kind="vl"`.
    `settings` (JSON-able: the format and its key/camera options) goes into the progress
    file, so `--resume` refuses to continue a run made with other settings. `spaces` (robot) declares the action
    and state spaces, checked on every episode by the writer (see `data_tools.space_choice`).
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
        "jpeg_quality": opts.jpeg_quality,
        "episodes_per_shard": opts.episodes_per_shard,
        "max_bytes": max_bytes,
        "settings": settings,
        "spaces": None if spaces is None else spaces.to_json(),
    }
    fingerprint = json.loads(json.dumps(fingerprint))

    kept: list[ShardInfo] | None = None
    start = 0
    skipped = Skipped()
    if opts.resume:
        if (out / "manifest.json").is_file() and not (out / PROGRESS_FILE).is_file():
            return Manifest.load(out)  # already complete
        kept, start, skipped = _read_progress(out, fingerprint)
        if start > len(sources):
            raise ValueError(f"{out}: {start} episodes are done but only {len(sources)} are asked for; raise --limit")
    elif opts.overwrite:
        (out / PROGRESS_FILE).unlink(missing_ok=True)

    writer = ShardWriter(
        out,
        name,
        kind,
        max_samples=opts.episodes_per_shard,
        max_bytes=max_bytes,
        image_ext=opts.image_ext,
        jpeg_quality=opts.jpeg_quality,
        extra={"source_format": settings.get("format", ""), "source": str(opts.src), **(extra or {})},
        overwrite=opts.overwrite,
        resume=kept,
        spaces=spaces,
    )
    fn = partial(_encoded, load=load, image_ext=opts.image_ext, quality=opts.jpeg_quality)
    todo = sources[start:]
    pool = multiprocessing.get_context(opts.start_method).Pool(opts.workers) if opts.workers > 1 else None
    try:
        loaded: Iterator[list[dict] | str] = pool.imap(fn, todo, chunksize=1) if pool is not None else map(fn, todo)
        with writer:
            bar = tqdm(loaded, total=len(sources), initial=start, desc=f"convert {name}", disable=not opts.progress)
            for i, samples in enumerate(bar, start=start):
                if isinstance(samples, str):
                    skipped.add(samples)
                    continue
                before = len(writer.shards)
                for sample in samples:
                    writer.write_sample(sample)
                # Record only when the finished shards hold exactly sources [0, i]: a source split into several
                # samples may have some of them in the open shard, and resuming after i would lose those.
                if len(writer.shards) > before and writer.open_samples == 0:
                    _write_progress(out, fingerprint, writer.shards, i + 1, skipped)
            if skipped.count == len(sources):
                raise ValueError(
                    f"all {len(sources)} sources were skipped, e.g. {skipped.first[0]}; check SRC and options"
                )
            if skipped.count:
                writer.extra["skipped"] = asdict(skipped)
        manifest = writer.close()
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    (out / PROGRESS_FILE).unlink(missing_ok=True)
    return manifest


def report(manifest: Manifest, out: str) -> None:
    """One summary line, plus how many sources were skipped and why (the first few)."""
    if manifest.kind == "robot":
        frames = sum(s.frames for s in manifest.shards)
        print(f"{out}: {manifest.num_samples} episodes, {frames} frames in {len(manifest.shards)} shards")
        print("\n".join(manifest.robot_spaces.describe()))
    else:
        print(f"{out}: {manifest.num_samples} samples in {len(manifest.shards)} shards")
    skipped = manifest.extra.get("skipped")
    if skipped:
        print(f"skipped {skipped['count']} sources; the first ones:")
        for reason in skipped["first"]:
            print(f"  {reason}")
