"""Training-loader throughput against LeRobot's `LeRobotDataset` on the same data (a script, not a test).

Why: issue 12 asks for a loader at least 2x LeRobot's in items/s, at no more CPU per frame. Both sides
read the same episodes: they are written once with lerobot's own writer (`LeRobotDataset.create` /
`add_frame` / `save_episode`), as PNG images in parquet and as AV1 video, and each LeRobot set is
converted with `python -m data_tools convert lerobot` (video frames decoded once, stored as PNG).

Same work per item: one item is one training window. Ours yields `data.window_size` frames, their states
and `data.fwd_pred_next_n`-step action chunks; LeRobot gets `delta_timestamps` for the same frames
(images and state at t-W+1..t, actions at t..t+W+N-2, from which the chunks are made). Ours also tokenises
the instruction, normalises state and action with stats.json and collates into a `Batch`; LeRobot's items
carry the task string and raw values (its normaliser runs later, in the policy), and its images arrive as
float32 [0, 1] where ours stay uint8.

Timing: each (loader, format, size) runs in its own subprocess, in rounds that interleave the two loaders;
a cell's figure is the median over rounds. CPU is the process tree's (the measuring process and its
DataLoader workers, via psutil) user+system time over the timed span, divided by the frames delivered.

Needs lerobot 0.4.4 importable (a side venv that sees this project's venv; see README "Data loader"):

    /work/lerobot-venv/bin/python tests/benchmarks/bench_vs_lerobot.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
FPS = 10
# Our side runs in the project's venv; only the lerobot side needs the side venv this script is started with.
OURS_PYTHON = os.environ.get("OURS_PYTHON") or str(REPO / ".venv" / "bin" / "python")
if not Path(OURS_PYTHON).is_file():
    OURS_PYTHON = sys.executable
# (batch size, DataLoader workers); the ones with workers first, because a video decoder the main process
# opened must not be shared with workers forked after it (LeRobot warns of segfaults; torchcodec fails).
WIDTHS = (8, 3, 2, 10, 12, 6, 9, 7)
CONFIGS = ((1, 2), (32, 2), (1, 0), (32, 0))


def import_lerobot():
    """`LeRobotDataset`, or None. torchvision's compiled ops may not load beside a newer torch; lerobot only
    needs their names registered (it never calls nms), so define the two schemas when they are missing."""
    try:
        import torch

        if not hasattr(import_lerobot, "lib"):
            try:
                lib = torch.library.Library("torchvision", "DEF")
                lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
                import_lerobot.lib = lib  # type: ignore[attr-defined]  # keep the registration alive
            except RuntimeError:
                pass  # torchvision's own ops loaded: nothing to register
        from lerobot.datasets.lerobot_dataset import LeRobotDataset
    except ImportError as err:
        print(f"lerobot is not importable here ({err}); nothing to compare against, skipping")
        return None
    return LeRobotDataset


def episode(index: int, size: int, length: int) -> tuple[list[np.ndarray], np.ndarray, np.ndarray, str]:
    """Frames, actions, states and instruction of a synth scene, cut or held to `length` frames."""
    from data_tools.synth import make_episode

    ep = make_episode(seed=0, index=index, image_size=size)
    take = [min(t, len(ep.action) - 1) for t in range(length)]
    frames = [ep.frames["rgb_static"][t] for t in take]
    return frames, ep.action[take].astype(np.float32), ep.state[take].astype(np.float32), ep.instruction


def write_lerobot(root: Path, video: bool, size: int, episodes: int, length: int) -> None:
    """A LeRobot v3.0 dataset written by lerobot itself (PNG images in parquet, or AV1 video)."""
    LeRobotDataset = import_lerobot()
    features = {
        "observation.image": {
            "dtype": "video" if video else "image",
            "shape": (size, size, 3),
            "names": ["height", "width", "channels"],
        },
        "observation.state": {"dtype": "float32", "shape": (4,), "names": ["x", "y", "z", "gripper"]},
        "action": {"dtype": "float32", "shape": (4,), "names": ["dx", "dy", "dz", "gripper"]},
    }
    ds = LeRobotDataset.create(f"bench/{root.name}", FPS, features=features, root=root, use_videos=video)
    for i in range(episodes):
        frames, action, state, task = episode(i, size, length)
        for t in range(length):
            ds.add_frame(
                {"observation.image": frames[t], "observation.state": state[t], "action": action[t], "task": task}
            )
        ds.save_episode()
    ds.finalize()


def build(folder: Path, size: int, episodes: int, length: int) -> None:
    """`folder/{png,av1}_{size}/lerobot` and `.../ours` (converted), unless already there."""
    for fmt in ("png", "av1"):
        cell = folder / f"{fmt}_{size}"
        if (cell / "ours" / "manifest.json").is_file():
            continue
        shutil.rmtree(cell, ignore_errors=True)
        start = time.perf_counter()
        write_lerobot(cell / "lerobot", fmt == "av1", size, episodes, length)
        wrote = time.perf_counter() - start
        cmd = [OURS_PYTHON, "-m", "data_tools", "convert", "lerobot", str(cell / "lerobot"), str(cell / "ours")]
        subprocess.run([*cmd, "--workers", "1"], check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        print(
            f"built {cell.name}: lerobot writer {wrote:.1f} s, converted in {time.perf_counter() - start - wrote:.1f} s"
        )


class CpuClock:
    """User+system CPU seconds of this process and all its descendants (the DataLoader workers)."""

    def __init__(self) -> None:
        import psutil

        self.me = psutil.Process()

    def read(self) -> float:
        total = 0.0
        for p in [self.me, *self.me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except Exception:  # a worker that just exited
                pass
        return total


def timed(batches, batch_size: int, frames_per_item: int, min_seconds: float, warmup: int) -> dict:
    """items/s and CPU ms per frame after `warmup` batches, over at least `min_seconds` and 64 items."""
    it = iter(batches)
    for _ in range(warmup):
        next(it)
    clock = CpuClock()
    cpu0, t0, items = clock.read(), time.perf_counter(), 0
    while True:
        next(it)
        items += batch_size
        elapsed = time.perf_counter() - t0
        if elapsed >= min_seconds and items >= 64:
            break
    cpu = clock.read() - cpu0
    return {"items_s": items / elapsed, "cpu_ms_frame": 1000 * cpu / (items * frames_per_item)}


def loop(loader):
    while True:
        yield from loader


def measure_ours(path: Path, bs: int, workers: int, args: argparse.Namespace) -> dict:
    from vla_scale.config.schema import DataConfig, SourceConfig
    from vla_scale.data.loader import StreamSpec, build_dataloader
    from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer

    cfg = DataConfig(
        sources=[SourceConfig(path=str(path))],
        num_workers=workers,
        window_size=args.window,
        fwd_pred_next_n=args.chunk,
    )
    spec = StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=bs)
    loader = build_dataloader(cfg, spec, build_tiny_tokenizer())
    out = timed(loop(loader), bs, args.window, args.seconds, args.warmup)
    del loader
    return out


def measure_lerobot(path: Path, bs: int, workers: int, args: argparse.Namespace) -> dict:
    import torch

    LeRobotDataset = import_lerobot()
    w, n = args.window, args.chunk
    deltas = None
    if w > 1 or n > 1:
        past = [(i - w + 1) / FPS for i in range(w)]
        deltas = {"observation.image": past, "observation.state": past, "action": [i / FPS for i in range(w + n - 1)]}
    ds = LeRobotDataset(f"bench/{path.parent.name}", root=path, delta_timestamps=deltas)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=bs, shuffle=True, num_workers=workers, persistent_workers=workers > 0, drop_last=True
    )
    out = timed(loop(loader), bs, w, args.seconds, args.warmup)
    del loader
    return out


def child(args: argparse.Namespace) -> None:
    """Measure every (batch, workers) config of one (loader, dataset) and print them as one JSON line."""
    import torch

    torch.set_num_threads(1)
    path = Path(args.child_path)
    fn = measure_ours if args.child_side == "ours" else measure_lerobot
    results = {f"{bs},{w}": fn(path, bs, w, args) for bs, w in CONFIGS}
    print("RESULT " + json.dumps(results), flush=True)


def run_child(side: str, path: Path, args: argparse.Namespace) -> dict:
    python = OURS_PYTHON if side == "ours" else sys.executable
    cmd = [python, __file__, "--child-side", side, "--child-path", str(path)]
    cmd += ["--window", str(args.window), "--chunk", str(args.chunk), "--seconds", str(args.seconds)]
    cmd += ["--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not line:
        raise RuntimeError(
            f"{side} on {path} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    return json.loads(line[0][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", help="folder for the built datasets, kept for reuse (default: a temp folder)")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 224], help="frame sizes (default: 64 224)")
    p.add_argument("--formats", nargs="+", default=["png", "av1"], choices=["png", "av1"])
    p.add_argument("--episodes", type=int, default=50)
    p.add_argument("--length", type=int, default=50, help="frames per episode (default: %(default)s)")
    p.add_argument("--window", type=int, default=1, help="frames per item, data.window_size (default: %(default)s)")
    p.add_argument("--chunk", type=int, default=1, help="action chunk, data.fwd_pred_next_n (default: %(default)s)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=2.0, help="timed span per cell (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing (default: %(default)s)")
    p.add_argument("--child-side", help=argparse.SUPPRESS)
    p.add_argument("--child-path", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_side:
        child(args)
        return
    if import_lerobot() is None:
        return
    import lerobot
    import torch

    print("command:", " ".join([sys.executable, *sys.argv]))
    print(
        f"lerobot {lerobot.__version__ if hasattr(lerobot, '__version__') else '?'}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs; window {args.window} frame(s), action chunk {args.chunk}"
    )
    tmp = None if args.data else tempfile.TemporaryDirectory(prefix="bench_vs_lerobot_")
    folder = Path(args.data or tmp.name)
    folder.mkdir(parents=True, exist_ok=True)
    for size in args.sizes:
        build(folder, size, args.episodes, args.length)
    if args.rounds == 0:
        return
    results: dict[tuple, list[dict]] = {}
    for r in range(args.rounds):
        for fmt in args.formats:
            for size in args.sizes:
                cell = folder / f"{fmt}_{size}"
                sides = ["ours", "lerobot"] if r % 2 == 0 else ["lerobot", "ours"]
                for side in sides:
                    res = run_child(side, cell / ("ours" if side == "ours" else "lerobot"), args)
                    for cfg, v in res.items():
                        results.setdefault((side, fmt, size, cfg), []).append(v)
        print(f"round {r + 1}/{args.rounds} done", flush=True)

    def med(side: str, fmt: str, size: int, cfg: str, key: str) -> float:
        return float(np.median([v[key] for v in results[(side, fmt, size, cfg)]]))

    print(f"\nmedians over {args.rounds} rounds; items/s (ours / lerobot = ratio), CPU ms per frame (ours / lerobot)")
    head = ("set", "bs", "w", "ours it/s", "lerobot it/s", "ratio", "ours cpu", "lr cpu")
    print(" ".join(f"{h:>{n}}" for h, n in zip(head, WIDTHS, strict=True)))
    for fmt in args.formats:
        for size in args.sizes:
            for bs, w in CONFIGS:
                cfg = f"{bs},{w}"
                a, b = med("ours", fmt, size, cfg, "items_s"), med("lerobot", fmt, size, cfg, "items_s")
                ca, cb = med("ours", fmt, size, cfg, "cpu_ms_frame"), med("lerobot", fmt, size, cfg, "cpu_ms_frame")
                row = (f"{fmt} {size}", bs, w, f"{a:.0f}", f"{b:.0f}", f"{a / b:.2f}x", f"{ca:.3f}", f"{cb:.3f}")
                print(" ".join(f"{v:>{n}}" for v, n in zip(row, WIDTHS, strict=True)))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
