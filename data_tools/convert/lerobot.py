"""`python -m data_tools convert lerobot SRC OUT`: a LeRobot dataset folder (v2.x or v3.0).

Read directly with pyarrow and PyAV: the `lerobot` package does not install beside our
torch and drags in GBs of CUDA wheels, and the on-disk format is simple (see
meta/info.json `codebase_version`):
- v3.0: many episodes per `data/chunk-C/file-F.parquet` and per mp4; one row per episode
  in `meta/episodes/**/*.parquet` says which files and at which video timestamp it starts.
- v2.x: one parquet and one mp4 per episode; `meta/episodes.jsonl` lists the episodes.
Images are either video features (decoded with PyAV) or parquet structs of PNG (or JPEG)
bytes, passed on as bytes (copied into the shards unchanged under `--image-ext auto`).

Tasks: an episode whose metadata lists several tasks is split where its frames' `task_index`
changes, into episodes `ep<N>_<segment>` that each carry their own task as the instruction
(a vla_scale episode has one instruction, so a training window never spans two tasks; meta
keeps `episode_index`, `segment` and `frame_start`). Single-task episodes stay `ep<N>`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_tools.convert.common import ConvertOptions, add_common_args, convert, parse_cameras, report
from data_tools.space_choice import add_space_args, space_choice
from vla_scale.data.format import Episode, FormatError

VERSIONS = ("v2.0", "v2.1", "v3.0")


@dataclass(frozen=True)
class Source:
    """Where one episode lives; small and picklable, so workers get it cheaply."""

    root: str
    episode_index: int
    length: int
    instruction: str
    data_file: str  # relative to root
    videos: tuple[tuple[str, str, float], ...]  # (camera, mp4 relative to root, start time in s)
    images: tuple[tuple[str, str], ...]  # (camera, parquet image column)
    state_key: str
    action_key: str
    fps: float
    version: str
    tasks: tuple[tuple[int, str], ...] = ()  # (task_index, task) when the episode has several tasks


def read_info(root: Path) -> dict:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise FormatError(f"{path} not found: {root} is not a LeRobot dataset folder (expected meta/info.json)")
    info = json.loads(path.read_text())
    version = info.get("codebase_version")
    if version not in VERSIONS:
        raise FormatError(f"{path}: codebase_version {version!r} is not supported (this converter reads {VERSIONS})")
    return info


def read_tasks(root: Path, version: str) -> dict[str, int]:
    """task text → task_index, from meta/tasks.parquet (v3.0: the text is the pandas index) or meta/tasks.jsonl."""
    if version == "v3.0":
        path = root / "meta" / "tasks.parquet"
        if not path.is_file():
            raise FormatError(f"{path} not found: an episode lists several tasks, and only this file numbers them")
        table = pq.read_table(path)
        text = next((c for c in ("task", "__index_level_0__") if c in table.column_names), None)
        if text is None or "task_index" not in table.column_names:
            raise FormatError(f"{path}: expected columns task and task_index, found {table.column_names}")
        return dict(zip(table.column(text).to_pylist(), table.column("task_index").to_pylist(), strict=True))
    path = root / "meta" / "tasks.jsonl"
    if not path.is_file():
        raise FormatError(f"{path} not found: an episode lists several tasks, and only this file numbers them")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["task"]: int(row["task_index"]) for row in rows}


def default_cameras(features: dict) -> dict[str, str]:
    """First non-wrist image feature → rgb_static, first with 'wrist' in its name → rgb_wrist."""
    keys = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
    wrist = [k for k in keys if "wrist" in k.lower()]
    static = [k for k in keys if k not in wrist]
    cameras = {}
    if static:
        cameras["rgb_static"] = static[0]
    if wrist:
        cameras["rgb_wrist"] = wrist[0]
    return cameras


def _episode_rows_v3(root: Path) -> list[dict]:
    files = sorted((root / "meta" / "episodes").glob("**/*.parquet"))
    if not files:
        raise FormatError(f"{root}/meta/episodes/ holds no parquet files: not a complete LeRobot v3.0 dataset")
    rows = [row for f in files for row in pq.read_table(f).to_pylist()]
    return sorted(rows, key=lambda r: r["episode_index"])


def _episode_rows_v2(root: Path) -> list[dict]:
    path = root / "meta" / "episodes.jsonl"
    if not path.is_file():
        raise FormatError(f"{path} not found: not a complete LeRobot v2 dataset")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["episode_index"])


def list_sources(root: Path, cameras: dict[str, str], state_key: str, action_key: str) -> list[Source]:
    """One Source per episode, in episode order."""
    info = read_info(root)
    version, features = info["codebase_version"], info.get("features", {})
    for name, key in cameras.items():
        if features.get(key, {}).get("dtype") not in ("video", "image"):
            images = [k for k, f in features.items() if f.get("dtype") in ("video", "image")]
            raise FormatError(f"--camera {name}={key}: {key!r} is not an image or video feature of {root} ({images})")
    for opt, key in (("--state-key", state_key), ("--action-key", action_key)):
        if key not in features:
            raise FormatError(f"{opt} {key!r} is not a feature of {root}; its features are {sorted(features)}")
    videos = {n: k for n, k in cameras.items() if features[k]["dtype"] == "video"}
    images = tuple((n, k) for n, k in cameras.items() if features[k]["dtype"] == "image")
    fps = float(info.get("fps", 0) or 0)
    sources = []
    rows = _episode_rows_v3(root) if version == "v3.0" else _episode_rows_v2(root)
    numbers: dict[str, int] | None = None
    for row in rows:
        ep = int(row["episode_index"])
        if version == "v3.0":
            data_file = info["data_path"].format(chunk_index=row["data/chunk_index"], file_index=row["data/file_index"])
            vids = tuple(
                (
                    name,
                    info["video_path"].format(
                        video_key=key,
                        chunk_index=row[f"videos/{key}/chunk_index"],
                        file_index=row[f"videos/{key}/file_index"],
                    ),
                    float(row[f"videos/{key}/from_timestamp"]),
                )
                for name, key in videos.items()
            )
        else:
            chunk = ep // int(info.get("chunks_size", 1000))
            data_file = info["data_path"].format(episode_chunk=chunk, episode_index=ep)
            vids = tuple(
                (name, info["video_path"].format(episode_chunk=chunk, video_key=key, episode_index=ep), 0.0)
                for name, key in videos.items()
            )
        tasks = list(row.get("tasks") or [])
        several: tuple[tuple[int, str], ...] = ()
        if len(tasks) > 1:
            numbers = read_tasks(root, version) if numbers is None else numbers
            unknown = [t for t in tasks if t not in numbers]
            if unknown:
                raise FormatError(f"{root}: episode {ep} lists tasks {unknown} that meta/tasks does not number")
            several = tuple((numbers[t], t) for t in tasks)
        sources.append(
            Source(
                str(root), ep, int(row["length"]), tasks[0] if tasks else "", data_file, vids, images,
                state_key, action_key, fps, version, several,
            )
        )  # fmt: skip
    return sources


def column_matrix(table: pa.Table, key: str, where: str) -> np.ndarray:
    """A list / fixed-size-list / scalar column → float32 [rows, D]."""
    if key not in table.column_names:
        raise FormatError(f"{where}: no column {key!r} (columns: {table.column_names})")
    col = table.column(key).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type) or pa.types.is_fixed_size_list(col.type):
        flat = pc.list_flatten(col).to_numpy(zero_copy_only=False)
        return flat.astype(np.float32).reshape(len(col), -1)
    return col.to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(col), 1)


def read_video_frames(path: Path, start: float, count: int, fps: float) -> list[np.ndarray]:
    """`count` RGB frames from time `start` on (seek to the keyframe before, then decode forward)."""
    tolerance = 0.5 / fps if fps > 0 else 1e-3
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if start > 0 and stream.time_base is not None:
                container.seek(int(Fraction(start) / stream.time_base), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is not None and frame.time < start - tolerance:
                    continue
                frames.append(frame.to_ndarray(format="rgb24"))
                if len(frames) == count:
                    break
    except (av.FFmpegError, OSError) as err:
        raise FormatError(f"{path}: cannot decode video ({err})") from err
    if len(frames) < count:
        raise FormatError(f"{path}: only {len(frames)} frames from {start:.3f} s on, the episode needs {count}")
    return frames


def task_segments(table: pa.Table, src: Source, where: str) -> list[tuple[int, int, str]]:
    """(start, end, task) runs of equal per-frame `task_index`; the whole episode when it has one task."""
    if not src.tasks:
        return [(0, table.num_rows, src.instruction)]
    if "task_index" not in table.column_names:
        raise FormatError(f"{where}: the episode lists {len(src.tasks)} tasks but its rows have no task_index column")
    index = table.column("task_index").to_numpy(zero_copy_only=False)
    names = dict(src.tasks)
    bad = sorted(set(index.tolist()) - set(names))
    if bad:
        raise FormatError(f"{where}: rows name task_index {bad}, not among the episode's tasks {src.tasks}")
    cuts = [0, *(np.flatnonzero(index[1:] != index[:-1]) + 1).tolist(), len(index)]
    return [(a, b, names[int(index[a])]) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]


def load_episode(src: Source) -> list[Episode]:
    """Read one episode's rows, arrays and frames (runs in a worker process); several when its task changes."""
    root = Path(src.root)
    path = root / src.data_file
    columns = [src.state_key, src.action_key, "episode_index", "frame_index", *(k for _, k in src.images)]
    columns += ["task_index"] if src.tasks else []
    try:
        table = pq.read_table(path, columns=columns, filters=[("episode_index", "=", src.episode_index)])
    except (OSError, pa.ArrowInvalid) as err:
        raise FormatError(f"{path}: cannot read episode {src.episode_index} ({err})") from err
    table = table.sort_by("frame_index")
    where = f"{path} episode {src.episode_index}"
    if table.num_rows != src.length:
        raise FormatError(f"{where}: {table.num_rows} rows, but the episode metadata says {src.length}")
    frames: dict[str, list[np.ndarray]] = {}
    for name, key in src.images:
        cells = table.column(key).to_pylist()
        if any(not (c and c.get("bytes")) for c in cells):
            raise FormatError(f"{where}: image column {key!r} has rows without embedded bytes")
        frames[name] = [c["bytes"] for c in cells]  # the writer copies or decodes them (`encode_camera`)
    for name, rel, start in src.videos:
        frames[name] = read_video_frames(root / rel, start, src.length, src.fps)
    meta = {"source_format": "lerobot", "lerobot_version": src.version, "episode_index": src.episode_index}
    if src.fps:
        meta["fps"] = src.fps
    action = column_matrix(table, src.action_key, where)
    state = column_matrix(table, src.state_key, where)
    segments = task_segments(table, src, where)
    if len(segments) == 1:
        return [Episode(f"ep{src.episode_index:06d}", segments[0][2], action, state, frames, meta)]
    return [
        Episode(
            key=f"ep{src.episode_index:06d}_{i:02d}",
            instruction=task,
            action=action[a:b],
            state=state[a:b],
            frames={name: f[a:b] for name, f in frames.items()},
            meta={**meta, "segment": i, "frame_start": a},
        )
        for i, (a, b, task) in enumerate(segments)
    ]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert lerobot`."""
    p = subparsers.add_parser(
        "lerobot",
        help="a LeRobot dataset folder (v2.x or v3.0) on local disk",
        description=__doc__.splitlines()[0]
        + " Default cameras: the first image/video feature with 'wrist' in its name → rgb_wrist, "
        "the first other one → rgb_static.",
    )
    add_common_args(p)
    p.add_argument("--state-key", default="observation.state", help="(default: %(default)s)")
    p.add_argument("--action-key", default="action", help="(default: %(default)s)")
    add_space_args(p)
    p.set_defaults(func=run)


def feature_names(feature: dict) -> tuple[str, ...]:
    """Per-dimension names from info.json (a list, or {"motors": [...]}-style), or none when not one per dim."""
    names = feature.get("names")
    if isinstance(names, dict) and len(names) == 1:
        names = next(iter(names.values()))
    shape = feature.get("shape") or [0]
    if (
        isinstance(names, list)
        and len(shape) == 1
        and len(names) == shape[0]
        and all(isinstance(n, str) for n in names)
    ):
        return tuple(names)
    return ()


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions.from_args(args)
    root = Path(opts.src)
    info = read_info(root)
    cameras = parse_cameras(opts.cameras, default_cameras(info.get("features", {})))
    sources = list_sources(root, cameras, args.state_key, args.action_key)
    settings = {"format": "lerobot", "cameras": cameras, "state_key": args.state_key, "action_key": args.action_key}
    name = str(info.get("repo_id") or root.resolve().name)
    features = info.get("features", {})
    spaces = space_choice(args, feature_names(features[args.action_key]), feature_names(features[args.state_key]))
    extra = {"lerobot_version": info["codebase_version"]}
    manifest = convert(sources, load_episode, opts, name, settings, extra=extra, spaces=spaces)
    report(manifest, opts.out)
    return 0
