"""Real-time chunking in closed loop: a trained flow policy under simulated inference delay, with and without RTC.

    .venv/bin/python tests/benchmarks/bench_rtc.py [--out runs/bench_rtc] [--delays 1 2 3] [--overlap 4]
        [--episodes 20] [--export PATH]    # --export: evaluate that flow export instead of training one

Without --export, every step the way a user runs it, each in its own process group (closed_loop.py's phases):
`python -m data_tools collect` of the instruct demonstrations (the `make demo` recipe), `launchers/train.sh
configs/instruct_flow_cpu.yaml` on 2 CPU ranks (the instruct recipe with the flow-matching expert and 8-step
chunks), `vla-scale export`. Then `vla-scale eval` on held-out seeds:
- `sync`: a new chunk every `chunk - overlap` steps with no latency (the robot waits for each inference, which
  in a simulator costs no time): the same replanning period as the delayed runs, the reference;
- for each delay D: `--delay D --overlap K` (naive asynchronous execution: the new chunk replaces the old one
  at once, its first D rows stale) and the same with `--rtc` (real-time chunking's inpainting).

Printed per run: success with its Wilson 95% interval, the action's mean L2 change at a chunk switch and
within a chunk, how far a new chunk's first executed action departs from what the replaced chunk planned for
that step, and the stale rows skipped. Figures go to <out>/bench_rtc.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import yaml
from bench_common import command_line, table
from closed_loop import RECIPES, BenchError, cli, collect_command, eval_command, run_phase, train_overrides

CONFIG = "configs/instruct_flow_cpu.yaml"


def build_export(args: argparse.Namespace, out: Path, env: dict[str, str]) -> tuple[Path, int]:
    """Collect, train and export the flow policy under `out`; returns the export and the frames' size."""
    recipe = dataclasses.replace(RECIPES["instruct"], config=CONFIG)
    logs, data = out / "logs", out / "data" / "instruct"
    if not (data / "robot" / "manifest.json").is_file():
        cmd = collect_command("instruct", recipe, data, recipe.collect_episodes, 0, args.workers)
        run_phase("collect", cmd, logs / "collect.log", args.phase_timeout, env)
    run_dir, export = out / "runs" / "instruct", out / "export"
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: train.sh would resume an existing one
    overrides = train_overrides(recipe, "instruct", out, args.max_steps or None, smoke=False)
    train_env = {k: v for k, v in env.items() if k != "OMP_NUM_THREADS"}  # train.sh splits the cores by rank
    run_phase(
        "train", ["bash", "launchers/train.sh", CONFIG, *overrides], logs / "train.log", args.phase_timeout, train_env
    )
    shutil.rmtree(export, ignore_errors=True)
    run_phase("export", cli("export", str(run_dir), str(export)), logs / "export.log", args.phase_timeout, env)
    manifest = json.loads((data / "robot" / "manifest.json").read_text())
    return export, int(manifest["image_size"][0])


def chunk_size(export: Path) -> int:
    spec = yaml.safe_load((export / "vla_config.yaml").read_text())
    return int(spec["data"]["fwd_pred_next_n"])


def runs(delays: list[int], overlap: int, chunk: int) -> dict[str, list[str]]:
    """Eval options by run name."""
    out = {"sync": ["--exec-steps", str(chunk - overlap)]}
    for d in delays:
        out[f"delay {d}"] = ["--delay", str(d), "--overlap", str(overlap)]
        out[f"delay {d} + rtc"] = ["--delay", str(d), "--overlap", str(overlap), "--rtc"]
    return out


def row(name: str, results: dict) -> list[str]:
    o = results["overall"]
    s = o["success"]
    lo, hi = s["ci95"]
    fmt = lambda key: f"{o[key]:.4f}" if key in o else "-"  # noqa: E731
    return [
        name,
        f"{s['rate']:.2f} [{lo:.2f}, {hi:.2f}]",
        fmt("switch_jump"),
        fmt("step_jump"),
        fmt("switch_departure"),
        str(o.get("stale_rows_skipped", 0)),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/bench_rtc", help="work and results folder (default: %(default)s)")
    parser.add_argument("--export", default=None, help="a flow policy export to evaluate (default: train one)")
    parser.add_argument("--image-size", type=int, default=64, help="rendered frame size for --export's policy")
    parser.add_argument("--delays", type=int, nargs="+", default=[1, 2, 3], help="simulated delays in steps")
    parser.add_argument("--overlap", type=int, default=4, help="request the next chunk at this many actions left")
    parser.add_argument("--episodes", type=int, default=20, help="eval episodes per task (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=0, help="train.max_steps (default: the config's)")
    parser.add_argument("--workers", type=int, default=2, help="collect and eval worker processes (default: 2)")
    parser.add_argument("--phase-timeout", type=float, default=3600.0, help="seconds any one phase may take")
    args = parser.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
    env.setdefault("OMP_NUM_THREADS", "1")
    recipe = RECIPES["instruct"]
    start = time.perf_counter()
    try:
        if args.export:
            export, image_size = Path(args.export).resolve(), args.image_size
        else:
            export, image_size = build_export(args, out, env)
        chunk = chunk_size(export)
        if not 1 <= max(args.delays) <= args.overlap < chunk:
            parser.error(f"need 1 <= delays <= --overlap ({args.overlap}) < the policy's chunk ({chunk})")
        results = {}
        for name, extra in runs(args.delays, args.overlap, chunk).items():
            dest = out / "eval" / name.replace(" ", "_").replace("+", "")
            shutil.rmtree(dest, ignore_errors=True)
            options = [str(export), *extra, "--videos", "0"]
            cmd = eval_command("instruct", recipe, options, args.episodes, args.workers, image_size, name, dest)
            run_phase(f"eval {name}", cmd, out / "logs" / f"eval_{dest.name}.log", args.phase_timeout, env)
            results[name] = json.loads((dest / "results.json").read_text())
    except BenchError as err:
        print(f"bench_rtc: error: {err}", file=sys.stderr)
        return 1
    print(f"\n$ {command_line()}")
    print(f"flow policy {export} (chunk {chunk}), instruct suite, {args.episodes} episodes per task x 4 tasks")
    print(f"overlap {args.overlap}: the next chunk is requested when {args.overlap} actions of the current one remain")
    header = ["run", "success [95% CI]", "switch jump", "step jump", "departure from plan", "stale rows"]
    print(table(header, [row(name, r) for name, r in results.items()]))
    print(f"wall time {time.perf_counter() - start:.0f} s")
    summary = {"command": command_line(), "args": vars(args), "export": str(export), "chunk": chunk}
    summary["runs"] = {name: r["overall"] for name, r in results.items()}
    (out / "bench_rtc.json").write_text(json.dumps(summary, indent=2, default=str))
    print(f"figures: {out / 'bench_rtc.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
