"""PNG curves of a run's metrics.jsonl, one file per term, for when wandb is offline or unavailable.

Uses `matplotlib.figure.Figure` with the Agg canvas directly (no pyplot), so plotting holds
no global state and is safe inside other programs and threads.
"""

from __future__ import annotations

import re
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from vla_scale.train.metrics import read_metrics

PLOTTED = re.compile(r"^(loss.*|acc.*|lr|grad_norm|samples_per_s|tokens_per_s)$")


def plot_terms(records: list[dict]) -> list[str]:
    """Keys worth a curve: loss and accuracy terms, learning rate, grad norm, throughput."""
    keys = {k for r in records for k in r if k != "step"}
    return sorted(k for k in keys if PLOTTED.match(k))


def _filename(term: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", term) + ".png"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write `<out_dir>/<term>.png` (default `<run_dir>/plots`) for every plotted term; returns the files."""
    records = read_metrics(run_dir)
    terms = plot_terms(records)
    if not terms:
        raise ValueError(f"{run_dir}/metrics.jsonl has no loss/acc/lr/grad_norm/throughput values to plot")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for term in terms:
        points = [(r["step"], r[term]) for r in records if term in r and r[term] is not None]
        fig = Figure(figsize=(6, 3.5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="." if len(points) < 50 else None)
        ax.set_xlabel("step")
        ax.set_title(term)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / _filename(term)
        fig.savefig(path, format="png")
        written.append(path)
    return written
