"""`vla-scale` command line: prepare a run and resolve its directory (used by the launchers), summarise, plot
and export one; evaluate and serve a policy."""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

from vla_scale.config import ConfigError


def _prepare(args: argparse.Namespace) -> int:
    from vla_scale.train.prepare import prepare_run

    # stdout carries the run directory alone (the launchers read it with `$(...)`); anything else printed while
    # preparing goes to stderr, e.g. DeepSpeed's accelerator warning when writing a tiny backbone imports it.
    with contextlib.redirect_stdout(sys.stderr):
        run_dir = prepare_run(args.config, args.overrides, args.world_size)
    print(run_dir)
    return 0


def _run_dir(args: argparse.Namespace) -> int:
    from vla_scale.train.run_dir import resolve_run_dir

    try:
        run_dir = resolve_run_dir(args.config, args.overrides, args.world_size, args.wait_for, args.timeout)
    except TimeoutError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


def summarize(run_dir: str | Path, key: str = "loss_arm") -> str:
    """Human summary of a finished run from its metrics.jsonl."""
    from vla_scale.train.metrics import read_metrics

    records = [r for r in read_metrics(run_dir) if key in r]
    if not records:
        raise ValueError(f"{run_dir}/metrics.jsonl has no '{key}' values")
    first, last = records[0], records[-1]
    ratio = last[key] / first[key] if first[key] else float("nan")
    lines = [
        f"run directory: {Path(run_dir).resolve()}",
        f"steps logged:  {len(records)} (last step {last['step']})",
        f"first {key}: {first[key]:.4f} (step {first['step']})",
        f"last  {key}: {last[key]:.4f} (step {last['step']})",
        f"ratio last/first: {ratio:.3f}",
    ]
    return "\n".join(lines)


def _summary(args: argparse.Namespace) -> int:
    print(summarize(args.run_dir, args.key))
    if args.max_ratio is not None:
        from vla_scale.train.metrics import read_metrics

        values = [r[args.key] for r in read_metrics(args.run_dir) if args.key in r]
        if values[-1] > args.max_ratio * values[0]:
            print(f"FAILED: last {args.key} is above {args.max_ratio:.0%} of the first", file=sys.stderr)
            return 1
        print(f"OK: last {args.key} is at most {args.max_ratio:.0%} of the first")
    return 0


def _export(args: argparse.Namespace) -> int:
    from vla_scale.train.export import ExportError, export_policy

    try:
        out = export_policy(args.run_dir, args.out_dir, tag=args.tag, merge_lora_adapters=not args.keep_lora)
    except ExportError as err:
        print(f"export error: {err}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from vla_scale.train.plot import plot_run

    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vla-scale", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="validate a config and lay out its run directory; prints the run directory")
    p.add_argument("config", help="YAML run config, e.g. configs/debug.yaml")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides")
    p.add_argument("--world-size", type=int, default=1, help="total ranks the job will start")
    p.set_defaults(fn=_prepare)
    r = sub.add_parser(
        "run-dir",
        help="print a run's directory without writing anything; with --wait-for, once node 0 has prepared it",
    )
    r.add_argument("config", help="YAML run config")
    r.add_argument("overrides", nargs="*", help="section.key=value overrides")
    r.add_argument("--world-size", type=int, required=True, help="total ranks the job will start")
    r.add_argument("--wait-for", default=None, metavar="HOST:PORT", help="node 0's rendezvous address")
    r.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for node 0")
    r.set_defaults(fn=_run_dir)
    s = sub.add_parser("summary", help="first/last loss of a run from its metrics.jsonl")
    s.add_argument("run_dir")
    s.add_argument("--key", default="loss_arm")
    s.add_argument("--max-ratio", type=float, default=None, help="exit 1 unless last/first <= this")
    s.set_defaults(fn=_summary)
    e = sub.add_parser("export", help="write a self-contained policy folder (safetensors + config + stats) of a run")
    e.add_argument("run_dir")
    e.add_argument("out_dir", help="new (or empty) folder for the policy")
    e.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_00000004 (default: latest)")
    e.add_argument("--keep-lora", action="store_true", help="keep LoRA adapters separate instead of merging them")
    e.set_defaults(fn=_export)
    g = sub.add_parser("plot", help="PNG curves of every loss/metric term in a run's metrics.jsonl")
    g.add_argument("run_dir")
    g.add_argument("--out", default=None, help="output folder (default: RUN_DIR/plots)")
    g.set_defaults(fn=_plot)
    from vla_scale.eval.cli import add_parsers as add_eval_parsers  # eval, eval-report

    add_eval_parsers(sub)
    from vla_scale.serve.cli import add_parser as add_serve_parser

    add_serve_parser(sub)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
