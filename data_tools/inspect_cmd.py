"""`python -m data_tools inspect DATASET_DIR`: a summary and PNG contact sheets of a dataset.

Why: after a conversion the numbers can be right while the content is wrong (swapped
cameras, a flipped image, actions in the wrong units); one look at frames, instructions
and action curves catches that before a training run does.

Named `inspect_cmd.py` so that it never shadows the standard library's `inspect` when
`data_tools/` itself is on `sys.path`; the command is still `inspect`.
"""

from __future__ import annotations

import argparse
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_tools.shards import iter_dataset
from data_tools.upload import local_copy
from vla_scale.data.format import Episode, Manifest, VLSample, decode_episode, decode_vl
from vla_scale.data.locations import is_remote

EXAMPLES = 3  # instructions / conversations printed


@dataclass
class Survey:
    """What one pass over the shards collects: counts for the summary, decoded samples for the plots."""

    manifest: Manifest
    lengths: list[int] = field(default_factory=list)
    instructions: list[str] = field(default_factory=list)  # distinct, in dataset order
    turns: list[int] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    vl: list[VLSample] = field(default_factory=list)


def survey(folder: str | Path, keep: int) -> Survey:
    """Read every sample's metadata and fully decode the first `keep` samples."""
    manifest = Manifest.load(folder)
    out = Survey(manifest)
    for _, sample in iter_dataset(folder, manifest):
        if manifest.kind == "robot":
            meta = json.loads(sample["meta.json"])
            out.lengths.append(int(meta.get("length", 0)))
            instruction = str(meta.get("instruction", ""))
            if instruction not in out.instructions and len(out.instructions) < 1000:
                out.instructions.append(instruction)
            if len(out.episodes) < keep:
                out.episodes.append(decode_episode(sample))
        else:
            out.turns.append(len(json.loads(sample["json"]).get("conversations", [])))
            if len(out.vl) < keep:
                out.vl.append(decode_vl(sample))
    return out


def _short(text: str, width: int = 100) -> str:
    return textwrap.shorten(" ".join(str(text).split()), width=width, placeholder="...")


def summary(s: Survey) -> str:
    """The printed report: layout, dims, lengths and a few examples."""
    m = s.manifest
    lines = [
        f"name:        {m.name}",
        f"kind:        {m.kind} (schema {m.schema_version})",
        f"shards:      {len(m.shards)}",
        f"samples:     {m.num_samples}",
        f"image size:  {m.image_size or 'varies'} (H, W)",
    ]
    if m.kind == "robot":
        lengths = np.asarray(s.lengths or [0])
        lines += [
            f"frames:      {sum(sh.frames for sh in m.shards)}",
            f"cameras:     {', '.join(m.cameras) or '-'}",
            f"dims:        action {m.action_dim}, state {m.state_dim}",
            *m.robot_spaces.describe(),
            f"ep. length:  min {lengths.min()}, mean {lengths.mean():.1f}, max {lengths.max()}",
            f"instructions ({len(s.instructions)}{'+' if len(s.instructions) >= 1000 else ''} distinct), e.g.:",
        ]
        lines += [f"  - {_short(text)}" for text in s.instructions[:EXAMPLES]]
    else:
        turns = np.asarray(s.turns or [0])
        lines.append(f"turns:       min {turns.min()}, mean {turns.mean():.1f}, max {turns.max()} per conversation")
        lines.append("conversations, e.g.:")
        for sample in s.vl[:EXAMPLES]:
            lines.append(f"  [{sample.key}]")
            lines += [f"    {t.get('from', '?')}: {_short(t.get('value', ''))}" for t in sample.conversations]
    return "\n".join(lines)


def _figure(rows: int, cols: int, cell: tuple[float, float]) -> tuple[Any, np.ndarray]:
    """A pyplot-free figure (Agg canvas), so no display or global backend is touched."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(cols * cell[0], rows * cell[1]), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def plot_frames(episodes: list[Episode], camera: str, path: Path, per_row: int = 6) -> Path:
    """A row per episode: `per_row` evenly spaced frames of `camera`, the instruction as row title."""
    fig, axes = _figure(len(episodes), per_row, (1.6, 1.9))
    for row, ep in zip(axes, episodes, strict=True):
        steps = np.unique(np.linspace(0, ep.length - 1, per_row).round().astype(int))
        for ax, t in zip(row, steps, strict=False):
            ax.imshow(ep.frames[camera][t])
            ax.set_xlabel(f"t={t}", fontsize=7)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
            if not ax.images:
                ax.set_axis_off()
        row[0].set_title(_short(f"{ep.key}: {ep.instruction}", 90), loc="left", fontsize=8)
    fig.suptitle(f"{camera}: {len(episodes)} episodes", fontsize=9)
    fig.savefig(path, dpi=80)
    return path


def plot_actions(episodes: list[Episode], path: Path) -> Path:
    """One panel per action dimension, one line per episode, over time steps."""
    dims = episodes[0].action.shape[1]
    fig, axes = _figure(dims, 1, (6.0, 1.5))
    for d, ax in enumerate(axes[:, 0]):
        for ep in episodes:
            ax.plot(ep.action[:, d], linewidth=1, label=ep.key)
        ax.set_ylabel(f"action[{d}]", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[-1, 0].set_xlabel("time step", fontsize=8)
    axes[0, 0].legend(fontsize=6, ncol=min(len(episodes), 4), loc="upper right")
    fig.savefig(path, dpi=80)
    return path


def plot_vl(samples: list[VLSample], path: Path, per_row: int = 4) -> Path:
    """A grid of images, each titled with the first question and answer of its conversation."""
    rows = -(-len(samples) // per_row)
    fig, axes = _figure(rows, per_row, (2.4, 2.8))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, sample in zip(axes.flat, samples, strict=False):
        ax.imshow(sample.image)
        first = [_short(t.get("value", "").replace("<image>", ""), 60) for t in sample.conversations[:2]]
        ax.set_title(textwrap.fill(" / ".join(first), 32), fontsize=7)
    fig.savefig(path, dpi=80)
    return path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools inspect`."""
    p = subparsers.add_parser(
        "inspect",
        help="print a dataset summary and write PNG contact sheets (frames, actions, VL images)",
        description="Summarise a dataset and write PNGs: robot → frames.png and actions.png, VL → vl_samples.png.",
    )
    p.add_argument("dataset", metavar="DATASET", help="folder with manifest.json, or s3://, http(s)://, pipe: location")
    p.add_argument("--episodes", type=int, default=4, help="episodes / VL samples to plot (default: %(default)s)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the PNGs (default: DATASET_DIR/inspect, beside the shards it shows, never the current "
        "folder; readers ignore it; pass --out for a read-only dataset)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.episodes < 1:
        raise ValueError(f"--episodes must be at least 1, not {args.episodes}")
    if is_remote(args.dataset) and not args.out:
        raise ValueError(f"{args.dataset} is not a local folder: pass --out for the PNGs")
    with local_copy(args.dataset) as folder:  # a URL is fetched into a temporary folder first
        s = survey(folder, args.episodes)
    print(summary(s))
    out = Path(args.out) if args.out else Path(args.dataset) / "inspect"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot write PNGs into {out} ({err.strerror or err}); choose a folder with --out") from err
    if s.manifest.kind == "robot":
        camera = s.manifest.cameras[0] if s.manifest.cameras else None
        written = [plot_actions(s.episodes, out / "actions.png")]
        if camera is not None:
            written.insert(0, plot_frames(s.episodes, camera, out / "frames.png"))
    else:
        written = [plot_vl(s.vl, out / "vl_samples.png")]
    for path in written:
        print(f"wrote {path}")
    return 0
