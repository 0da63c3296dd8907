"""`python -m data_tools convert FORMAT SRC OUT [options]`: one module per source format.

Each format is a module `data_tools/convert/<format>.py` with `add_parser(subparsers)`
that registers `FORMAT`, its options, and `func(args) -> exit code`. Every converter
writes through `data_tools.writer.ShardWriter`, so the output format is defined once.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

FORMATS = ("lerobot", "rlds", "hdf5", "llava", "calvin")


def available_formats() -> list[str]:
    return [f for f in FORMATS if importlib.util.find_spec(f"data_tools.convert.{f}") is not None]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert` and one sub-command per available format."""
    p = subparsers.add_parser(
        "convert",
        help="convert a dataset from another format into vla_scale shards",
        description=__doc__.splitlines()[0],
    )
    formats = p.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for name in available_formats():
        importlib.import_module(f"data_tools.convert.{name}").add_parser(formats)
