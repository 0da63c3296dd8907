"""Toy source dataset for the converter tests and the converted-formats training test.

LeRobot v3.0 (episodes sharing data/video files) and v2.1 (one file per episode) datasets.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

FPS = 10
SIZE = 64
LENGTHS = (5, 7, 6)
TASKS = ("pick up the red block", "push the blue disc")


def frame(ep: int, t: int, cam: int) -> np.ndarray:
    """Four flat-coloured 32x32 blocks, different per episode, step and camera (video-codec friendly)."""
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    base = (ep * 70 + t * 23 + cam * 110) % 200
    for b, (r, c) in enumerate(((0, 0), (0, 32), (32, 0), (32, 32))):
        img[r : r + 32, c : c + 32] = ((base + 50 * b) % 256, (255 - base - 30 * b) % 256, (40 + 60 * b) % 256)
    return img


def state(ep: int, t: int) -> list[float]:
    return [ep * 100 + t + 0.25 * d for d in range(4)]


def action(ep: int, t: int, continuous_gripper: bool = False) -> list[float]:
    """The last dim is a binary gripper command (0/1), or a continuous gripper joint in -0.54..1.0 (SO-100 style)."""
    gripper = -0.54 + 1.54 * ((ep * 7 + t) % 11) / 10 if continuous_gripper else float(t % 2)
    return [ep - t * 0.5, 0.125 * t, gripper]


def png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def write_mp4(path: Path, frames: list[np.ndarray], codec: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        stream.codec_context.gop_size = 4  # keyframes inside episodes: the reader must seek and skip
        for img in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode())


def frame_table(eps: list[int], start_index: int, continuous_gripper: bool = False) -> pa.Table:
    """Data rows of these episodes: state, action, a PNG image column (the wrist camera) and indices."""
    rows = [(ep, t) for ep in eps for t in range(LENGTHS[ep])]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    return pa.table(
        {
            "observation.state": pa.array([state(e, t) for e, t in rows], pa.list_(pa.float32(), 4)),
            "action": pa.array([action(e, t, continuous_gripper) for e, t in rows], pa.list_(pa.float32(), 3)),
            "observation.images.wrist": pa.array(
                [{"bytes": png(frame(e, t, 1)), "path": f"frame_{t:06d}.png"} for e, t in rows], image_type
            ),
            "timestamp": pa.array([t / FPS for _, t in rows], pa.float32()),
            "frame_index": pa.array([t for _, t in rows], pa.int64()),
            "episode_index": pa.array([e for e, _ in rows], pa.int64()),
            "index": pa.array(range(start_index, start_index + len(rows)), pa.int64()),
            "task_index": pa.array([e % 2 for e, _ in rows], pa.int64()),
        }
    )


def features() -> dict:
    return {
        "observation.images.top": {"dtype": "video", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "c"]},
        "observation.images.wrist": {"dtype": "image", "shape": [SIZE, SIZE, 3], "names": ["height", "width", "c"]},
        "observation.state": {"dtype": "float32", "shape": [4], "names": None},
        "action": {"dtype": "float32", "shape": [3], "names": None},
        "timestamp": {"dtype": "float32", "shape": [1], "names": None},
        "frame_index": {"dtype": "int64", "shape": [1], "names": None},
        "episode_index": {"dtype": "int64", "shape": [1], "names": None},
        "index": {"dtype": "int64", "shape": [1], "names": None},
        "task_index": {"dtype": "int64", "shape": [1], "names": None},
    }


def make_v3(
    root: Path,
    codec: str = "libsvtav1",
    continuous_gripper: bool = False,
    video_files: dict[tuple[int, int], list[int]] | None = None,
) -> Path:
    """Episodes 0, 1 share data file 000 (episode 1 starts mid-file); episode 2 is in file 001.

    `video_files`: (chunk, file) → episodes of each mp4, when the videos roll over to new files (and chunks)
    elsewhere than the data does, as LeRobot's writer does when a video file reaches its size limit first;
    default: the data files' split.
    """
    files = {0: [0, 1], 1: [2]}
    videos = video_files or {(0, f): eps for f, eps in files.items()}
    info = {
        "codebase_version": "v3.0",
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet",
        "video_path": "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4",
        "features": features(),
    }
    (root / "meta" / "episodes" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    where: dict[int, tuple[int, int, float]] = {}  # episode -> video chunk, file, start in seconds
    for (chunk, f), eps in videos.items():
        write_mp4(
            root / "videos" / "observation.images.top" / f"chunk-{chunk:03d}" / f"file-{f:03d}.mp4",
            [frame(e, t, 0) for e in eps for t in range(LENGTHS[e])],
            codec,
        )
        offset = 0
        for e in eps:
            where[e] = (chunk, f, offset / FPS)
            offset += LENGTHS[e]
    rows, index = [], 0
    for f, eps in files.items():
        (root / "data" / "chunk-000").mkdir(parents=True, exist_ok=True)
        table = frame_table(eps, index, continuous_gripper)
        pq.write_table(table, root / "data" / "chunk-000" / f"file-{f:03d}.parquet")
        for e in eps:
            chunk, vfile, start = where[e]
            rows.append(
                {
                    "episode_index": e,
                    "tasks": [TASKS[e % 2]],
                    "length": LENGTHS[e],
                    "data/chunk_index": 0,
                    "data/file_index": f,
                    "dataset_from_index": index,
                    "dataset_to_index": index + LENGTHS[e],
                    "videos/observation.images.top/chunk_index": chunk,
                    "videos/observation.images.top/file_index": vfile,
                    "videos/observation.images.top/from_timestamp": start,
                    "videos/observation.images.top/to_timestamp": start + LENGTHS[e] / FPS,
                }
            )
            index += LENGTHS[e]
    pq.write_table(pa.Table.from_pylist(rows), root / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    pq.write_table(pa.table({"task": list(TASKS), "task_index": [0, 1]}), root / "meta" / "tasks.parquet")
    return root


def make_v21(root: Path, codec: str = "mpeg4") -> Path:
    """One parquet and one mp4 per episode; the wrist camera is a video too."""
    feats = features()
    feats["observation.images.wrist"]["dtype"] = "video"
    info = {
        "codebase_version": "v2.1",
        "fps": FPS,
        "chunks_size": 1000,
        "data_path": "data/chunk-{episode_chunk:03d}/episode_{episode_index:06d}.parquet",
        "video_path": "videos/chunk-{episode_chunk:03d}/{video_key}/episode_{episode_index:06d}.mp4",
        "features": feats,
    }
    (root / "meta").mkdir(parents=True)
    (root / "data" / "chunk-000").mkdir(parents=True)
    (root / "meta" / "info.json").write_text(json.dumps(info))
    lines, index = [], 0
    for e, length in enumerate(LENGTHS):
        table = frame_table([e], index).drop_columns(["observation.images.wrist"])
        pq.write_table(table, root / "data" / "chunk-000" / f"episode_{e:06d}.parquet")
        for cam, key in enumerate(("observation.images.top", "observation.images.wrist")):
            path = root / "videos" / "chunk-000" / key / f"episode_{e:06d}.mp4"
            write_mp4(path, [frame(e, t, cam) for t in range(length)], codec)
        lines.append(json.dumps({"episode_index": e, "tasks": [TASKS[e % 2]], "length": length}))
        index += length
    (root / "meta" / "episodes.jsonl").write_text("\n".join(lines) + "\n")
    (root / "meta" / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"task_index": i, "task": t}) for i, t in enumerate(TASKS))
    )
    return root
