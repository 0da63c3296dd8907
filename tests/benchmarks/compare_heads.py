"""Action heads compared in closed loop (issue 13, item 5): same data, same budget, one table.

    .venv/bin/python tests/benchmarks/compare_heads.py [--out runs/compare_heads] [--heads mlp,lstm,...]
        [--steps 400] [--episodes 20] [--workers 2]

The `instruct` suite's demonstrations are collected once (`python -m data_tools collect`, the recipe of
tests/benchmarks/closed_loop.py and `make demo`); then every head is trained on them from the same tiny random-weight
LLaVA (one checkpoint folder, written once) with configs/instruct_cpu.yaml, the same steps, batch and seed, on 2 CPU
ranks (`launchers/train.sh`), exported, and evaluated with `vla-scale eval --ensemble` on held-out seeds, plainly and
with swapped instructions. Printed per head: closed-loop success with its Wilson 95% interval, the swapped-instruction
rate (did the named task / did the original one), training samples/s (mean over the log windows after the first),
and `Policy.predict` median latency of the export (batch 1, one torch thread, tests/benchmarks/bench_policy_latency.py).

Where a head cannot take the recipe as it is, the difference is printed in the table's last column: the recipe's
spatial-softmax keypoints feed only the continuous heads and the flow expert (the token and parallel heads refuse
them), the history heads (lstm, gpt) see a 2-frame window (with one frame they have no history to fuse), and the
flow expert's gradient reaches the VLM (the recipe has no VL loss that would otherwise train it). Every phase runs
in its own process group, killed on timeout; figures go to <out>/compare_heads.json. The default budget (300 steps
x batch 64, 20 episodes per task) is sized for about 25 minutes on 2 idle cores for the six heads (an estimate from
closed_loop.py's instruct training, 0.4 s per step, and a tiny-budget run of this script; not yet measured end to
end).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from bench_common import command_line, table
from bench_policy_latency import time_policy
from closed_loop import (
    RECIPES,
    REPO,
    BenchError,
    _fmt,
    _rate,
    cli,
    collect_command,
    eval_command,
    load_json,
    run_phase,
    train_overrides,
)

SUITE = "instruct"
NO_KEYPOINTS = "model.keypoints=0"
HISTORY = ("data.window_size=2", "model.head.num_layers=2", "model.head.max_history=0")


@dataclass(frozen=True)
class Head:
    """One contender: overrides on the recipe config, and what they change besides the head (printed)."""

    overrides: tuple[str, ...]
    differs: str = ""


HEADS: dict[str, Head] = {
    "mlp": Head(()),
    "lstm": Head(("model.head.type=lstm", *HISTORY), "window 2"),
    "gpt": Head(("model.head.type=gpt", "model.head.num_heads=4", *HISTORY), "window 2"),
    "discrete": Head(("model.action_space=discrete", NO_KEYPOINTS), "no keypoints"),
    "parallel": Head(("model.action_space=parallel", NO_KEYPOINTS), "no keypoints"),
    "flow": Head(("model.action_space=flow", "model.flow.stop_gradient_to_vlm=false"), "expert's gradient to the VLM"),
    "fast": Head(("model.action_space=discrete", "model.discrete.tokenizer=fast", NO_KEYPOINTS), "no keypoints"),
}
DEFAULT_STEPS = 300  # x batch 64 (the recipe's): ~2.5 min per one-frame head, ~4.5 min per history head (2 idle cores)
LATENCY_CALLS, LATENCY_WARMUP = 100, 5


def prepare_head(head: str, data: Path, out: Path, env: dict[str, str], timeout_s: float) -> list[str]:
    """Extra overrides a head needs from the collected data before training: FAST fits its tokenizer on the
    robot demonstrations (`data_tools fit-fast`, chunks as long as the recipe's)."""
    if head != "fast":
        return []
    chunk = yaml.safe_load((REPO / RECIPES[SUITE].config).read_text())["data"]["fwd_pred_next_n"]
    dest = out / "fast" / "fast_tokenizer.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "data_tools", "fit-fast", str(data / "robot"), "--chunk", str(chunk)]
    cmd += ["--out", str(dest)]
    run_phase("fast fit", cmd, out / "logs" / head / "fit.log", timeout_s, env)
    return [f"model.discrete.fast_path={dest}"]


def train_samples_per_s(run_dir: Path) -> float | None:
    """Mean `samples_per_s` over the logged windows after the first (which holds start-up and warm-up)."""
    path = run_dir / "metrics.jsonl"
    rates = [r["samples_per_s"] for r in map(json.loads, path.read_text().splitlines()) if "samples_per_s" in r]
    rates = rates[1:] or rates
    return statistics.mean(rates) if rates else None


def predict_latency_ms(export: Path, image_size: int) -> float:
    """Median `Policy.predict` wall time of the export (batch 1, one torch thread)."""
    from vla_scale.policy import Policy

    torch.set_num_threads(1)
    policy = Policy.from_pretrained(export, device="cpu")
    return statistics.median(time_policy(policy, LATENCY_WARMUP, LATENCY_CALLS, image_size=image_size))


def run_head(head: str, args: argparse.Namespace, out: Path, image_size: int, env: dict[str, str]) -> dict:
    """Train, export, evaluate (plain and swapped) and time one head; returns its figures."""
    recipe = RECIPES[SUITE]
    logs, data = out / "logs" / head, out / "data" / SUITE
    run_dir, export = out / "runs" / head, out / "exports" / head
    walls: dict[str, float] = {}
    overrides = train_overrides(recipe, SUITE, out, args.steps, smoke=False)
    overrides += [f"run.name={head}", f"run.seed={args.seed}", "train.log_every=" + str(max(1, min(50, args.steps)))]
    if args.batch:
        overrides += [f"train.global_batch_size={args.batch}", f"train.micro_batch_size={args.batch // 2}"]
    overrides += [*HEADS[head].overrides, *prepare_head(head, data, out, env, args.phase_timeout)]
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["bash", "launchers/train.sh", recipe.config, *overrides]
    train_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # train.sh splits the cores by rank
    walls["train"] = run_phase(f"{head} train", cmd, logs / "train.log", args.phase_timeout, train_env)
    shutil.rmtree(export, ignore_errors=True)
    cmd = cli("export", str(run_dir), str(export))
    walls["export"] = run_phase(f"{head} export", cmd, logs / "export.log", args.phase_timeout, env)
    results = {}
    for name, extra in {"policy": [], "swap": ["--swap-instruction"]}.items():
        dest = out / "eval" / head / name
        shutil.rmtree(dest, ignore_errors=True)
        options = [str(export), "--ensemble", *extra, "--videos", "1"]
        cmd = eval_command(SUITE, recipe, options, args.episodes, args.workers, image_size, f"{head}/{name}", dest)
        walls[f"eval {name}"] = run_phase(
            f"{head} eval {name}", cmd, logs / f"eval_{name}.log", args.phase_timeout, env
        )
        results[name] = load_json(dest / "results.json")
    start = time.perf_counter()
    latency = predict_latency_ms(export, image_size)
    walls["latency"] = time.perf_counter() - start
    overall, swap = results["policy"]["overall"], results["swap"]["overall"]
    return {
        "success": _rate(overall["success"]),
        "swap_followed": _rate(swap["followed"]),
        "swap_original": _rate(swap["original"]),
        "train_samples_per_s": train_samples_per_s(run_dir),
        "predict_median_ms": latency,
        "differs": HEADS[head].differs,
        "wall_s": walls,
        "results": {name: str(out / "eval" / head / name / "results.json") for name in results},
    }


def report(figures: dict[str, dict], walls: dict[str, float], args: argparse.Namespace) -> str:
    rows = []
    for head, f in figures.items():
        samples = f["train_samples_per_s"]
        rows.append(
            [
                head,
                _fmt(f["success"]),
                f"{f['swap_followed']['rate']:.2f} / {f['swap_original']['rate']:.2f}",
                "-" if samples is None else f"{samples:.1f}",
                f"{f['predict_median_ms']:.1f}",
                f"{f['wall_s']['train']:.0f}",
                f["differs"] or "-",
            ]
        )
    header = [
        "head",
        "success [95% CI]",
        "swapped: named / original",
        "train samples/s",
        "predict ms",
        "train s",
        "vs recipe",
    ]
    n = len(RECIPES[SUITE].tasks) * args.episodes
    lines = [
        f"{SUITE} suite, {args.steps} steps x batch {args.batch or 64}, seed {args.seed}; {n} held-out episodes per "
        "eval (--ensemble); predict: median of 100 calls, batch 1, 1 thread",
        table(header, rows),
        "",
        "wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in walls.items()),
    ]
    for head, f in figures.items():
        lines.append(f"  {head}: " + ", ".join(f"{k} {v:.0f}" for k, v in f["wall_s"].items()))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/compare_heads", help="work and results folder (default: %(default)s)")
    parser.add_argument("--heads", default=",".join(HEADS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="train.max_steps per head (%(default)s)")
    parser.add_argument("--episodes", type=int, default=20, help="eval episodes per task (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="collect and eval worker processes (%(default)s)")
    parser.add_argument("--batch", type=int, default=0, help="global batch (default: the recipe's, 64)")
    parser.add_argument("--seed", type=int, default=0, help="run.seed of every head (default: %(default)s)")
    parser.add_argument(
        "--collect-episodes", type=int, default=0, help="demonstrations per task (default: the recipe's, 600)"
    )
    parser.add_argument("--phase-timeout", type=float, default=1800.0, help="seconds any one phase may take")
    args = parser.parse_args()
    heads = [h for h in args.heads.split(",") if h]
    unknown = [h for h in heads if h not in HEADS]
    if unknown or not heads:
        parser.error(f"--heads: unknown {unknown}; known: {', '.join(HEADS)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", "1")  # collect and eval workers: one thread each
    env.setdefault("PYTHON", sys.executable)  # launchers/train.sh: the interpreter running this script

    recipe, data = RECIPES[SUITE], out / "data" / SUITE
    start = time.perf_counter()
    walls: dict[str, float] = {}
    figures: dict[str, dict] = {}
    try:
        episodes = args.collect_episodes or recipe.collect_episodes
        cmd = collect_command(SUITE, recipe, data, episodes, recipe.grounding, args.workers)
        walls["collect"] = run_phase("collect", cmd, out / "logs" / "collect.log", args.phase_timeout, env)
        image_size = int(load_json(data / "robot" / "manifest.json")["image_size"][0])
        for head in heads:
            figures[head] = run_head(head, args, out, image_size, env)
    except BenchError as err:
        print(f"compare_heads: error: {err}", file=sys.stderr)
        return 1
    walls["total"] = time.perf_counter() - start
    print()
    print(report(figures, walls, args))
    print(f"\ncommand: {command_line()}")
    path = out / "compare_heads.json"
    summary = {"command": command_line(), "args": vars(args), "heads": figures, "wall_s": walls}
    path.write_text(json.dumps(summary, indent=2))
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
