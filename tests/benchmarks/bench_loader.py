"""Training-loader throughput vs. a naive per-frame file baseline (a script; pytest does not collect it).

Why: vla_scale stores one episode per webdataset sample, so a reader opens a few large
tar files and streams them, instead of opening an image file and an array file for every
frame as CALVIN-style per-frame folders do. This measures what that buys on this machine.

Both sides produce the same `Batch`es: frames decoded to uint8, actions and states
normalised with stats.json, instructions tokenised, collated by `collate_robot`. Only
the storage and reading differ. Files are read right after being written, so both sides
run from the page cache: this compares CPU cost, not disk speed.

    python tests/benchmarks/bench_loader.py                 # synthesises a dataset in a temp folder
    python tests/benchmarks/bench_loader.py DATA/robot      # an existing robot dataset
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from data_tools.shards import iter_dataset
from data_tools.synth import synth
from vla_scale.config.schema import DataConfig, SourceConfig
from vla_scale.data.collate import collate_robot
from vla_scale.data.format import Manifest, decode_image, decode_npy, load_stats
from vla_scale.data.loader import StreamSpec, build_dataloader
from vla_scale.data.normalize import Normalizer
from vla_scale.data.window import Window
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer


def write_per_frame(dataset: Path, out: Path) -> int:
    """Copy a robot dataset into `out/<episode>/<t>.png` + `<t>.npy` ([action, state]) files; returns frames."""
    manifest = Manifest.load(dataset)
    camera = manifest.cameras[0]
    instructions = {}
    frames = 0
    for _, sample in iter_dataset(dataset, manifest):
        key = sample["__key__"]
        meta = json.loads(sample["meta.json"])
        instructions[key] = meta["instruction"]
        arrays = np.concatenate([decode_npy(sample["action.npy"]), decode_npy(sample["state.npy"])], axis=1)
        folder = out / key
        folder.mkdir(parents=True)
        for t in range(meta["length"]):
            (folder / f"{t:04d}.png").write_bytes(sample[f"{camera}.{t:04d}.{meta['image_ext']}"])
            np.save(folder / f"{t:04d}.npy", arrays[t].astype(np.float32), allow_pickle=False)
            frames += 1
    (out / "instructions.json").write_text(json.dumps(instructions))
    return frames


class PerFrameDataset(Dataset):
    """Reads one PNG and one .npy per item, like a CALVIN-style per-frame loader."""

    def __init__(self, folder: Path, stats_from: Path, action_dim: int):
        self.instructions = json.loads((folder / "instructions.json").read_text())
        self.items = sorted(p.with_suffix("") for p in folder.glob("*/*.npy"))
        self.normalizer = Normalizer(load_stats(stats_from))
        self.action_dim = action_dim

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Window:
        stem = self.items[i]
        image = decode_image(stem.with_suffix(".png").read_bytes())
        arrays = np.load(stem.with_suffix(".npy"), allow_pickle=False)[None]
        action = self.normalizer.normalize_action(arrays[:, : self.action_dim])
        state = self.normalizer.normalize_state(arrays[:, self.action_dim :])
        return Window(
            key=f"{stem.parent.name}/{stem.name}",
            instruction=self.instructions[stem.parent.name],
            images=image[None],
            wrist_images=None,
            state=state,
            action=action[:, None],
            action_mask=np.ones((1, 1), dtype=bool),
        )


def measure(batches: Iterable, warmup: int, timed: int, batch_size: int) -> float:
    """Samples per second over `timed` batches, after `warmup` batches (worker start-up, caches)."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(timed):
        next(it)
    return timed * batch_size / (time.perf_counter() - start)


def bench_loader(dataset: Path, workers: int, args: argparse.Namespace, tokenizer) -> float:
    cfg = DataConfig(sources=[SourceConfig(path=str(dataset))], num_workers=workers, shuffle_buffer=64)
    loader = build_dataloader(cfg, StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=args.batch), tokenizer)
    rate = measure(loader, args.warmup, args.batches, args.batch)
    del loader  # stops its persistent workers before the next measurement
    return rate


def bench_per_frame(folder: Path, dataset: Path, workers: int, args: argparse.Namespace, tokenizer) -> float:
    manifest = Manifest.load(dataset)
    data = PerFrameDataset(folder, dataset, manifest.action_dim)

    def collate(windows: list[Window]):
        return collate_robot(windows, tokenizer, DataConfig().max_text_len)

    loader = DataLoader(
        data, batch_size=args.batch, shuffle=True, num_workers=workers, collate_fn=collate, drop_last=True
    )

    def forever() -> Iterable:
        while True:
            yield from loader

    return measure(forever(), args.warmup, args.batches, args.batch)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dataset", nargs="?", help="robot dataset folder (default: synthesise one in a temp folder)")
    p.add_argument("--episodes", type=int, default=200, help="episodes to synthesise (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="synthetic frame size (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="samples per batch (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=10, help="batches before timing (default: %(default)s)")
    p.add_argument("--batches", type=int, default=200, help="timed batches per figure (default: %(default)s)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="num_workers values (default: 1 2)")
    args = p.parse_args()
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, torch threads {torch.get_num_threads()}")

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        tmp_path = Path(tmp)
        if args.dataset:
            dataset = Path(args.dataset)
        else:
            start = time.perf_counter()
            synth(tmp_path / "synth", episodes=args.episodes, vl_samples=0, image_size=args.image_size, progress=False)
            dataset = tmp_path / "synth" / "robot"
            print(f"synthesised {args.episodes} episodes at {args.image_size}px in {time.perf_counter() - start:.1f} s")
        manifest = Manifest.load(dataset)
        frames = write_per_frame(dataset, tmp_path / "per_frame")
        print(
            f"dataset {dataset}: {manifest.num_samples} episodes, {frames} frames, {len(manifest.shards)} shards, "
            f"image {manifest.image_size}; per-frame copy: {2 * frames} files"
        )
        print(f"batch {args.batch}, warm-up {args.warmup} batches, timed {args.batches} batches per figure\n")
        tokenizer = build_tiny_tokenizer()
        print(f"{'num_workers':>11}  {'vla_scale loader':>18}  {'per-frame files':>18}  {'ratio':>6}")
        for workers in args.workers:
            ours = bench_loader(dataset, workers, args, tokenizer)
            naive = bench_per_frame(tmp_path / "per_frame", dataset, workers, args, tokenizer)
            print(f"{workers:>11}  {ours:>12.0f} smp/s  {naive:>12.0f} smp/s  {ours / naive:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
