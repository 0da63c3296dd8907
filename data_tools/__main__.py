"""`python -m data_tools <command> ...`.

Each command is one module `data_tools/<command>.py` with `add_parser(subparsers)`,
which registers its arguments and sets `func(args) -> exit code`; adding a command
(`convert`, `verify`, `stats`, `inspect`) means adding its name to COMMANDS.
COMMANDS holds module names: `inspect` lives in `inspect_cmd.py` so that it never
shadows the standard library's `inspect`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from data_tools.writer import DatasetWriteError
from vla_scale.data.format import FormatError

COMMANDS = ("synth", "collect", "convert", "verify", "stats", "inspect_cmd", "fit_fast", "upload")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data_tools", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"data_tools.{name}").add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one clear line instead of a traceback."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (DatasetWriteError, FormatError, ValueError) as err:
        print(f"data_tools {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"data_tools {args.command}: interrupted; unfinished datasets have no manifest.json", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
