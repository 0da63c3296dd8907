"""Tables of evaluation results: one run's per-task table, and several runs side by side (ablations)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path


def load_results(path: str | Path) -> dict:
    """A results.json, given as the file or as the folder that holds it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found; pass a results.json or the --out folder of `vla-scale eval`")
    results = json.loads(file.read_text())
    if "tasks" not in results or "overall" not in results:
        raise ValueError(f"{file} is not a results file of `vla-scale eval` (no 'tasks' / 'overall')")
    results.setdefault("_path", str(file))
    return results


def _cell(block: dict) -> str:
    lo, hi = block["ci95"]
    return f"{block['rate']:6.1%}  [{lo:5.1%}, {hi:5.1%}]"


def format_results(results: dict) -> str:
    """Per task: success rate, Wilson 95% interval, mean episode length (and swapped-instruction rates)."""
    swap = "followed" in results["overall"]
    names = list(results["tasks"]) + ["overall"]
    width = max(12, *(len(n) for n in names))
    metric = "followed (named task)" if swap else "success"
    head = f"{'task':<{width}}  {metric:<24}  {'episodes':>8}  {'mean length':>11}"
    if swap:
        head += f"  {'did original task':<24}"
    lines = [head, "-" * len(head)]
    for name in names:
        block = results["overall"] if name == "overall" else results["tasks"][name]
        if name == "overall":
            lines.append("-" * len(head))
        row = f"{name:<{width}}  {_cell(block['success']):<24}  {block['episodes']:>8}  {block['mean_length']:>11.1f}"
        if swap:
            row += f"  {_cell(block['original']):<24}"
        lines.append(row.rstrip())
    o = results["overall"]
    if "switch_jump" in o:
        text = f"action change (L2, raw units): {o['switch_jump']:.4f} at the {o['chunk_switches']} chunk switches"
        if "step_jump" in o:  # none when every step starts a chunk (--exec-steps 1)
            text += f", {o['step_jump']:.4f} between steps of one chunk"
        if "switch_departure" in o:
            text += f"; a new chunk departs {o['switch_departure']:.4f} from the replaced chunk's plan"
        if "stalled_steps" in o:
            text += f"; {o['stalled_steps']} stalled steps, {o['stale_rows_skipped']} stale rows skipped"
        lines.append(text)
    return "\n".join(lines)


def _label(results: dict) -> str:
    return str(results.get("config", {}).get("label") or Path(results["_path"]).parent.name)


def format_comparison(runs: Sequence[dict]) -> str:
    """Several results side by side: one summary row per run, then a task x run matrix of success rates."""
    labels = [_label(r) for r in runs]
    width = max(8, *(len(x) for x in labels))
    head = (
        f"{'run':<{width}}  {'suite':<10}  {'agent':<8}  {'success':<24}  {'followed':<8}  {'original':<8}  {'len':>6}"
    )
    lines = [head, "-" * len(head)]
    for label, r in zip(labels, runs, strict=True):
        o = r["overall"]
        followed = f"{o['followed']['rate']:.1%}" if "followed" in o else "-"
        original = f"{o['original']['rate']:.1%}" if "original" in o else "-"
        agent = str(r.get("config", {}).get("agent") or "?").split()[0]
        lines.append(
            f"{label:<{width}}  {r['suite']:<10}  {agent:<8}  {_cell(o['success']):<24}  "
            f"{followed:<8}  {original:<8}  {o['mean_length']:>6.1f}"
        )
    tasks = list(dict.fromkeys(t for r in runs for t in r["tasks"]))
    if not tasks:
        return "\n".join(lines)
    tw = max(8, *(len(t) for t in tasks))
    cols = [f"[{i + 1}]" for i in range(len(runs))]
    matrix = [f"{'task':<{tw}}" + "".join(f"  {c:>7}" for c in cols)]
    for task in tasks:
        cells = [f"{r['tasks'][task]['success']['rate']:7.1%}" if task in r["tasks"] else f"{'-':>7}" for r in runs]
        matrix.append(f"{task:<{tw}}" + "".join(f"  {c}" for c in cells))
    legend = [f"{c} {label}" for c, label in zip(cols, labels, strict=True)]
    return "\n".join([*lines, "", "success per task:", *matrix, *legend])
