"""Small hand-made datasets written with the real shard writer."""

import io
import tarfile
from pathlib import Path

import numpy as np

from data_tools.writer import ShardWriter
from vla_scale.data.format import Episode, VLSample


def make_episode(index: int, length: int, size: int = 16, action_dim: int = 4, state_dim: int = 4) -> Episode:
    """Episode whose values encode (index, t) so tests can tell exactly which frame/step arrived."""
    t = np.arange(length, dtype=np.float32)[:, None]
    action = np.concatenate([index + t / 100 + np.arange(action_dim - 1)[None] / 10, (t % 2)], axis=1)
    state = index * 10 + t + np.zeros((1, state_dim), np.float32)
    frames = [np.full((size, size, 3), (index * 7 + k) % 256, dtype=np.uint8) for k in range(length)]
    return Episode(
        f"ep{index:04d}", f"pick the block number {index}", action.astype(np.float32), state, {"rgb_static": frames}
    )


def write_robot(folder: Path, lengths: list[int], per_shard: int, ext: str = "png") -> Path:
    with ShardWriter(folder, "toy_robot", "robot", max_samples=per_shard, image_ext=ext) as w:
        for i, n in enumerate(lengths):
            w.write_episode(make_episode(i, n))
    return folder


def write_vl(folder: Path, n: int, per_shard: int) -> Path:
    with ShardWriter(folder, "toy_vl", "vl", max_samples=per_shard, image_ext="png") as w:
        for i in range(n):
            conv = [
                {"from": "human", "value": "<image>\nwhat colour is it?"},
                {"from": "gpt", "value": f"colour {i}"},
            ]
            w.write_vl(VLSample(f"vl{i:04d}", np.full((16, 16, 3), i, np.uint8), conv))
    return folder


def corrupt_first_image(shard_path: Path) -> str:
    """Rewrite a shard with the first frame's bytes replaced by garbage (a real corrupt JPEG/PNG)."""
    with tarfile.open(shard_path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    victim = next(m.name for m, _ in members if m.name.endswith(".0000.png"))
    with tarfile.open(shard_path, "w") as tar:
        for m, data in members:
            if m.name == victim:
                data = b"not an image at all"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return victim
