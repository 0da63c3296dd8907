"""Closed-loop benchmark: the full recipe (collect → train → evaluate) per simulator suite, against issue 11's targets.

    .venv/bin/python tests/benchmarks/closed_loop.py [--suites instruct,metaworld] [--out runs/closed_loop]
    .venv/bin/python tests/benchmarks/closed_loop.py --suites instruct --smoke    # minutes: checks the plumbing only

Per suite, every step the way a user runs it, each in its own process (group, killed on timeout):
`python -m data_tools collect` of scripted demonstrations, `launchers/train.sh` on 2 CPU ranks with the
suite's recipe config (data, run directory and tiny backbone redirected under --out, so it starts from
nothing), `vla-scale export`, then `vla-scale eval` over held-out seeds of the trained policy, of the
scripted expert and of a random-action agent, and on suites whose tasks share one scene also with
swapped instructions (does the policy do the task it is told, not the one it was trained on in that
scene). The expert and the policy are each evaluated with W workers and again with 1, which gives the
eval throughput ratios (the runner's episodes/s over its episode phase; each worker's start-up, which
is paid once per call whatever the number of episodes, is reported apart).

Prints one table (suite, task, policy success with its Wilson 95% interval, swapped-instruction rate,
expert, random), each target with met / not met, and the wall time of every phase; writes every
figure to <out>/closed_loop.json, each eval's results.json and videos under <out>/eval/<suite>/.
The full run is sized for about an hour on 2 cores; --smoke shrinks everything to a handful of
steps and episodes, whose figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml
from bench_common import REPO, command_line, table


@dataclass(frozen=True)
class Recipe:
    """How one suite is collected, trained and evaluated."""

    config: str  # recipe config, relative to the repo
    tasks: tuple[str, ...]  # collected, trained and evaluated; empty: every task of the suite
    collect_episodes: int  # demonstrations per task
    grounding: int  # grounding VL scenes (shared-scene suites)
    paired: bool  # --paired-scenes: each layout demonstrated once per instruction
    action_noise: float  # --action-noise: DART perturbations during collection (labels stay the expert's)
    swap: bool  # evaluate with swapped instructions (needs tasks that share one scene)


RECIPES: dict[str, Recipe] = {
    "instruct": Recipe(
        "configs/instruct_cpu.yaml",
        ("touch_red", "touch_green", "touch_blue", "touch_yellow"),
        collect_episodes=600,
        grounding=0,
        paired=True,
        action_noise=0.4,
        swap=True,
    ),
    "metaworld": Recipe(
        "configs/metaworld_cpu.yaml", (), collect_episodes=40, grounding=0, paired=False, action_noise=0.0, swap=False
    ),
}

# Issue 11's targets, each measured in this run.
TARGET_INSTRUCT_SUCCESS = 0.80
TARGET_INSTRUCT_SWAP = 0.80
TARGET_METAWORLD_MEAN = 0.50
TARGET_THROUGHPUT_RATIO = 1.8

# --smoke: a few steps and episodes, to check that every phase runs end to end.
SMOKE = {"collect_episodes": 2, "grounding": 8, "max_steps": 4, "episodes": 1}
SMOKE_TRAIN = ["optim.warmup_steps=1", "train.log_every=1", "data.shuffle_buffer=16"]


class BenchError(RuntimeError):
    """A phase failed or timed out (the message names it and quotes its log)."""


def run_phase(name: str, cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> float:
    """Run `cmd` in its own process group with output to `log`; returns its wall time. The whole group is
    killed on timeout, failure or Ctrl-C, so no rank or eval worker outlives the benchmark."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(cmd)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    wall = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        why = f"timed out after {timeout_s:.0f} s" if rc is None else f"failed (exit code {rc})"
        raise BenchError(f"{name} {why}; last lines of {log}:\n{tail}")
    print(f"[{name}] done in {wall:.1f} s", flush=True)
    return wall


def train_overrides(recipe: Recipe, suite: str, out: Path, max_steps: int | None, smoke: bool) -> list[str]:
    """Redirect the recipe's data, run directory and tiny backbone under `out`; the rest stays the recipe's."""
    cfg = yaml.safe_load((REPO / recipe.config).read_text())
    data = out / "data" / suite
    overrides = [f"data.sources.{i}.path={data / Path(s['path']).name}" for i, s in enumerate(cfg["data"]["sources"])]
    overrides += [
        f"run.output_dir={out / 'runs'}",
        f"run.name={suite}",
        f"model.backbone.pretrained={out / 'backbones' / f'tiny-llava-{suite}'}",
    ]
    if max_steps is not None:
        overrides += [f"train.max_steps={max_steps}", f"train.ckpt_every={min(max_steps, cfg['train']['ckpt_every'])}"]
    if smoke:
        overrides += SMOKE_TRAIN
    return overrides


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "vla_scale.cli", *args]


def collect_command(suite: str, recipe: Recipe, data: Path, episodes: int, grounding: int, workers: int) -> list[str]:
    """`python -m data_tools collect` of the recipe's demonstrations (`episodes` per task) into `data`."""
    tasks = ["--tasks", ",".join(recipe.tasks)] if recipe.tasks else []
    cmd = [sys.executable, "-m", "data_tools", "collect", suite, str(data), *tasks, "--overwrite"]
    cmd += ["--episodes", str(episodes), "--workers", str(workers)]
    cmd += (["--grounding", str(grounding)] if grounding else []) + (["--paired-scenes"] if recipe.paired else [])
    cmd += ["--action-noise", str(recipe.action_noise)] if recipe.action_noise else []
    return cmd


def eval_command(
    suite: str, recipe: Recipe, extra: list[str], episodes: int, workers: int, image_size: int, label: str, dest: Path
) -> list[str]:
    """`vla-scale eval` on the recipe's tasks (`extra`: the export or agent and options) writing to `dest`."""
    tasks = ["--tasks", ",".join(recipe.tasks)] if recipe.tasks else []
    cmd = cli("eval", *extra, "--suite", suite, *tasks, "--episodes", str(episodes), "--workers", str(workers))
    return cmd + ["--image-size", str(image_size), "--label", label, "--out", str(dest)]


def load_json(path: Path) -> dict:
    return json.loads(path.read_text())


def run_suite(suite: str, args: argparse.Namespace, out: Path, env: dict[str, str]) -> dict:
    """Collect, train, export and evaluate one suite; returns its figures and phase wall times."""
    recipe = RECIPES[suite]
    smoke = args.smoke
    episodes = args.episodes or (SMOKE["episodes"] if smoke else 20)
    collect_episodes = args.collect_episodes or (SMOKE["collect_episodes"] if smoke else recipe.collect_episodes)
    max_steps = args.max_steps or (SMOKE["max_steps"] if smoke else None)
    grounding = min(recipe.grounding, SMOKE["grounding"]) if smoke else recipe.grounding
    logs, data = out / "logs" / suite, out / "data" / suite
    run_dir, export = out / "runs" / suite, out / "exports" / suite
    walls: dict[str, float] = {}

    cmd = collect_command(suite, recipe, data, collect_episodes, grounding, args.workers)
    walls["collect"] = run_phase(f"{suite} collect", cmd, logs / "collect.log", args.phase_timeout, env)
    manifest = load_json(data / "robot" / "manifest.json")
    image_size = int(manifest["image_size"][0])

    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: train.sh would resume an existing one
    cmd = ["bash", "launchers/train.sh", recipe.config, *train_overrides(recipe, suite, out, max_steps, smoke)]
    train_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # train.sh splits the cores by rank
    walls["train"] = run_phase(f"{suite} train", cmd, logs / "train.log", args.phase_timeout, train_env)

    shutil.rmtree(export, ignore_errors=True)
    walls["export"] = run_phase(
        f"{suite} export", cli("export", str(run_dir), str(export)), logs / "export.log", args.phase_timeout, env
    )

    # The policy's chunks are executed with temporal ensembling, as `make demo` does (README "Where the policies
    # stand": it removes the instruct policy's last-millimetre failures).
    evals = {
        "policy": [str(export), "--ensemble", "--videos", "2"],
        "expert": ["--agent", "expert", "--videos", "1"],
        "expert_w1": ["--agent", "expert", "--videos", "1"],  # the same work as "expert", for the throughput ratio
        "policy_w1": [str(export), "--ensemble", "--videos", "2"],  # and as "policy"
        "random": ["--agent", "random", "--videos", "1"],
    }
    if recipe.swap:
        evals["policy_swap"] = [str(export), "--ensemble", "--swap-instruction", "--videos", "2"]
    results: dict[str, dict] = {}
    for name, extra in evals.items():
        dest = out / "eval" / suite / name
        shutil.rmtree(dest, ignore_errors=True)
        workers = 1 if name.endswith("_w1") else args.workers
        cmd = eval_command(suite, recipe, extra, episodes, workers, image_size, f"{suite}/{name}", dest)
        log = logs / f"eval_{name}.log"
        walls[f"eval {name}"] = run_phase(f"{suite} eval {name}", cmd, log, args.phase_timeout, env)
        results[name] = load_json(dest / "results.json")
    return summarize_suite(suite, results, walls, args.workers, out)


def _rate(block: dict) -> dict:
    return {"rate": block["rate"], "ci95": block["ci95"], "successes": block["successes"], "n": block["n"]}


def summarize_suite(suite: str, results: dict[str, dict], walls: dict[str, float], workers: int, out: Path) -> dict:
    """Per-task and mean figures of one suite from its `vla-scale eval` results."""
    swap = results.get("policy_swap")
    tasks = {}
    for task, block in results["policy"]["tasks"].items():
        tasks[task] = {
            "policy": _rate(block["success"]),
            "swap_followed": _rate(swap["tasks"][task]["followed"]) if swap else None,
            "swap_did_original": _rate(swap["tasks"][task]["original"]) if swap else None,
            "expert": _rate(results["expert"]["tasks"][task]["success"]),
            "random": _rate(results["random"]["tasks"][task]["success"]),
        }
    mean = {
        key: sum(t[key]["rate"] for t in tasks.values()) / len(tasks)
        for key in ("policy", "swap_followed", "expert", "random")
        if all(t[key] is not None for t in tasks.values())
    }
    throughput = {}
    for agent in ("expert", "policy"):
        t_w, t_1 = results[agent]["timing"], results[f"{agent}_w1"]["timing"]
        throughput[agent] = {
            "workers": workers,
            "episodes_per_s": t_w["episodes_per_s"],
            "episodes_per_s_1_worker": t_1["episodes_per_s"],
            "ratio": t_w["episodes_per_s"] / t_1["episodes_per_s"],
            "startup_s": t_w["startup_s"],
            "startup_s_1_worker": t_1["startup_s"],
        }
    videos = sorted({str(Path(e["video"]).parent) for r in results.values() for e in r["episodes"] if "video" in e})
    return {
        "tasks": tasks,
        "overall": {"policy": _rate(results["policy"]["overall"]["success"])}
        | ({"swap_followed": _rate(swap["overall"]["followed"])} if swap else {}),
        "mean": mean,
        "throughput": throughput,
        "wall_s": walls,
        "results": {name: str(out / "eval" / suite / name / "results.json") for name in results},
        "videos": videos,
    }


def _fmt(r: dict | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["ci95"]
    return f"{r['rate']:.2f} [{lo:.2f}, {hi:.2f}]"


def targets(figures: dict[str, dict]) -> list[dict]:
    """Each target of issue 11: its value in this run (None: not measured) and whether it is met."""
    rows = []

    def add(name: str, value: float | None, goal: float) -> None:
        rows.append({"target": name, "value": value, "goal": goal, "met": None if value is None else value >= goal})

    ins, mw = figures.get("instruct"), figures.get("metaworld")
    add("instruct: policy success (held-out seeds)", ins and ins["overall"]["policy"]["rate"], TARGET_INSTRUCT_SUCCESS)
    add("instruct: swapped instruction followed", ins and ins["overall"]["swap_followed"]["rate"], TARGET_INSTRUCT_SWAP)
    add("metaworld: mean policy success over tasks", mw and mw["mean"]["policy"], TARGET_METAWORLD_MEAN)
    for suite, fig in figures.items():
        for agent, tp in fig["throughput"].items():
            name = f"{suite}: eval episodes/s, {tp['workers']} workers / 1 ({agent})"
            add(name, tp["ratio"], TARGET_THROUGHPUT_RATIO)
    return rows


def report(figures: dict[str, dict], total_s: float) -> str:
    rows = []
    for suite, fig in figures.items():
        for task, t in fig["tasks"].items():
            rows.append([suite, task, *(_fmt(t[k]) for k in ("policy", "swap_followed", "expert", "random"))])
        m = fig["mean"]
        rows.append(
            [suite, "mean over tasks"]
            + [f"{m[k]:.2f}" if k in m else "-" for k in ("policy", "swap_followed", "expert", "random")]
        )
    header = ["suite", "task", "policy success [95% CI]", "swap followed", "expert", "random"]
    lines = ["closed-loop success on held-out seeds", table(header, rows), "", "targets:"]
    for t in targets(figures):
        value = "not measured" if t["value"] is None else f"{t['value']:.2f}"
        met = "-" if t["met"] is None else "met" if t["met"] else "NOT MET"
        lines.append(f"  {t['target']:<52} {value:>12}  (>= {t['goal']:.2f})  {met}")
    lines += ["", "eval throughput (episode phase; worker start-up apart):"]
    for suite, fig in figures.items():
        for agent, tp in fig["throughput"].items():
            lines.append(
                f"  {suite} {agent}: {tp['episodes_per_s']:.2f} episodes/s with {tp['workers']} workers, "
                f"{tp['episodes_per_s_1_worker']:.2f} with 1 (ratio {tp['ratio']:.2f}); start-up "
                f"{tp['startup_s']:.1f} s / {tp['startup_s_1_worker']:.1f} s"
            )
    lines += ["", "wall time per phase (s):"]
    for suite, fig in figures.items():
        lines.append(f"  {suite}: " + ", ".join(f"{k} {v:.0f}" for k, v in fig["wall_s"].items()))
    lines.append(f"  total: {total_s:.0f} s ({total_s / 60:.1f} min)")
    lines += ["", "videos:"] + [f"  {v}" for fig in figures.values() for v in fig["videos"]]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suites", default="instruct,metaworld", help="comma-separated (default: %(default)s)")
    parser.add_argument("--episodes", type=int, default=0, help="eval episodes per task (default: 20; smoke 1)")
    parser.add_argument(
        "--collect-episodes", type=int, default=0, help="demonstrations per task (default: the recipe's; smoke 2)"
    )
    parser.add_argument("--max-steps", type=int, default=0, help="train.max_steps (default: the config's; smoke 4)")
    parser.add_argument("--workers", type=int, default=2, help="collect and eval worker processes (default: 2)")
    parser.add_argument("--out", default="runs/closed_loop", help="work and results folder (default: %(default)s)")
    parser.add_argument("--phase-timeout", type=float, default=3600.0, help="seconds any one phase may take")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the plumbing, figures mean nothing")
    args = parser.parse_args()
    suites = [s for s in args.suites.split(",") if s]
    unknown = [s for s in suites if s not in RECIPES]
    if unknown or not suites:
        parser.error(f"--suites: unknown {unknown}; known: {', '.join(RECIPES)}")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", "1")  # collect and eval workers: one thread each, or they fight over cores

    start = time.perf_counter()
    figures: dict[str, dict] = {}
    try:
        for suite in suites:
            figures[suite] = run_suite(suite, args, out, env)
    except BenchError as err:
        print(f"closed_loop: error: {err}", file=sys.stderr)
        return 1
    total = time.perf_counter() - start
    print()
    print(report(figures, total))
    print(f"\ncommand: {command_line()}")
    summary = {
        "command": command_line(),
        "args": vars(args),
        "suites": figures,
        "targets": targets(figures),
        "total_wall_s": total,
    }
    path = out / "closed_loop.json"
    path.write_text(json.dumps(summary, indent=2))
    print(f"figures: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
