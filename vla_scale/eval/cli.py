"""`vla-scale eval PATH --suite S --out DIR` and `vla-scale eval-report DIR...`.

`eval` runs a policy (an export folder, or a run directory whose latest checkpoint is
exported once, before the workers start) or a baseline agent (`--agent random|expert`,
no PATH) in closed loop, prints a per-task table and writes DIR/results.json and
DIR/videos/. `eval-report` prints several results side by side, e.g. an ablation.
Everything heavy is imported inside the commands, so `vla-scale --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from functools import partial
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register `eval` and `eval-report` on the `vla-scale` subcommand parser."""
    p = sub.add_parser("eval", help="closed-loop evaluation of a policy (or a baseline agent) in a simulator suite")
    p.add_argument("path", nargs="?", default=None, help="policy export folder or run directory (--agent policy)")
    p.add_argument("--suite", required=True, help="simulator suite, e.g. instruct or metaworld")
    p.add_argument("--tasks", default="", help="comma-separated tasks (default: every task of the suite)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per task (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="worker processes, 0 = in this process (default: 1)")
    p.add_argument("--agent", choices=("policy", "random", "expert"), default="policy", help="(default: policy)")
    p.add_argument("--exec-steps", type=int, default=1, help="actions of each chunk run open-loop (default: 1)")
    p.add_argument("--ensemble", action="store_true", help="temporal ensembling of overlapping chunks (ACT)")
    p.add_argument(
        "--delay",
        type=int,
        default=None,
        metavar="D",
        help="simulated inference latency in steps: chunks run asynchronously, each from D steps after its request",
    )
    p.add_argument(
        "--overlap", type=int, default=None, metavar="K", help="with --delay: request at K actions left (default: D)"
    )
    p.add_argument("--rtc", action="store_true", help="with --delay: real-time chunking (flow policies)")
    p.add_argument(
        "--swap-instruction",
        action="store_true",
        help="show another task's instruction in each scene and score whether the named task was done",
    )
    p.add_argument("--videos", type=int, default=2, help="episodes per task recorded as video (default: 2)")
    p.add_argument("--video-format", choices=("mp4", "gif"), default="mp4")
    p.add_argument("--seed-offset", type=int, default=0, help="first held-out episode index (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="rendered frame size; match the training data")
    p.add_argument("--server", default=None, metavar="URL", help="query a running `vla-scale serve` (ws://host:port)")
    p.add_argument("--device", default="cpu", help="torch device of the policy in each worker (default: cpu)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a worker may take for one episode")
    p.add_argument("--label", default="", help="name of this run in eval-report tables (default: the --out folder)")
    p.add_argument("--out", required=True, help="folder for results.json and videos/")
    p.set_defaults(fn=run_eval)
    r = sub.add_parser("eval-report", help="print several `vla-scale eval` results side by side")
    r.add_argument("results", nargs="+", help="results.json files or the --out folders holding them")
    r.set_defaults(fn=run_report)


def run_eval(args: argparse.Namespace) -> int:
    from vla_scale.eval.agents import Execution, make_agent
    from vla_scale.eval.report import format_results
    from vla_scale.eval.runner import EvalConfig, EvalError, evaluate

    if args.agent == "policy" and not args.path and not args.server:
        print(
            "vla-scale eval: error: give PATH (an export folder or run directory) or --server URL, "
            "or --agent random|expert",
            file=sys.stderr,
        )
        return 2
    if args.agent != "policy" and (args.delay is not None or args.overlap is not None or args.rtc):
        print("vla-scale eval: error: --delay, --overlap and --rtc apply to --agent policy only", file=sys.stderr)
        return 2
    try:  # what can be checked before a worker loads the policy
        Execution(args.exec_steps, args.ensemble, delay=args.delay, overlap=args.overlap, rtc=args.rtc).check()
    except ValueError as err:
        print(f"vla-scale eval: error: {err}", file=sys.stderr)
        return 2
    cfg = EvalConfig(
        suite=args.suite,
        tasks=[t for t in args.tasks.split(",") if t],
        episodes=args.episodes,
        workers=args.workers,
        exec_steps=args.exec_steps,
        ensemble=args.ensemble,
        delay=args.delay,
        overlap=args.overlap,
        rtc=args.rtc,
        swap_instruction=args.swap_instruction,
        videos=args.videos,
        video_format=args.video_format,
        seed_offset=args.seed_offset,
        image_size=args.image_size,
        out_dir=args.out,
        timeout_s=args.timeout,
        agent=_agent_label(args),
        label=args.label,
    )
    with tempfile.TemporaryDirectory(prefix="vla_eval-") as tmp:
        try:
            local = args.agent == "policy" and not args.server
            policy = export_if_run_dir(args.path, Path(tmp)) if local else None
            factory = partial(
                make_agent,
                kind=args.agent,
                path=None if policy is None else str(policy),
                exec_steps=args.exec_steps,
                ensemble=args.ensemble,
                delay=args.delay,
                overlap=args.overlap,
                rtc=args.rtc,
                device=args.device,
                server=args.server if args.agent == "policy" else None,
            )
            results = evaluate(factory, cfg, progress=sys.stdout.isatty())
        except (ValueError, OSError, EvalError) as err:  # OSError: no such export, no server at --server
            print(f"vla-scale eval: error: {err}", file=sys.stderr)
            return 2
    t = results["timing"]
    print(
        f"{cfg.suite}: {cfg.agent}, {len(results['episodes'])} episodes in {t['wall_s']:.1f} s "
        f"(start-up {t['startup_s']:.1f} s, then {t['episodes_per_s']:.2f} episodes/s with {cfg.workers or 1} "
        f"worker{'s' if cfg.workers > 1 else ''})"
    )
    print(format_results(results))
    print(f"results: {Path(args.out) / 'results.json'}")
    videos = [e["video"] for e in results["episodes"] if "video" in e]
    if videos:
        print(f"videos:  {Path(videos[0]).parent} ({len(videos)} files)")
    return 0


def _agent_label(args: argparse.Namespace) -> str:
    """What results.json records as the evaluated agent."""
    if args.agent != "policy":
        return args.agent
    return f"policy {args.server}" if args.server else f"policy {Path(args.path).resolve()}"


def export_if_run_dir(path: str | Path, tmp: Path) -> Path:
    """An export folder as is; a run directory's latest checkpoint exported into `tmp` (once, not per worker)."""
    path = Path(path)
    if (path / "vla_config.yaml").is_file():
        return path
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        from vla_scale.train.export import export_policy

        return Path(export_policy(path, tmp / "policy"))
    raise FileNotFoundError(
        f"{path} is neither a policy export (no vla_config.yaml) nor a run directory with checkpoints/"
    )


def run_report(args: argparse.Namespace) -> int:
    from vla_scale.eval.report import format_comparison, load_results

    try:
        runs = [load_results(p) for p in args.results]
    except (FileNotFoundError, ValueError) as err:
        print(f"vla-scale eval-report: error: {err}", file=sys.stderr)
        return 2
    print(format_comparison(runs))
    return 0
