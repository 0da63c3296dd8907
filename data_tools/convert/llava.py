"""`python -m data_tools convert llava SRC OUT --image-folder DIR`: LLaVA-style JSON → a VL dataset.

SRC is a JSON list of `{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}`
(LLaVA-Instruct, ShareGPT4V, ...); `image` is a path relative to `--image-folder`. Each
entry becomes one VL sample with its conversation unchanged. Text-only entries (no
`image`) and multi-image entries are left out and counted, since a VL sample holds one
image. Entries whose image file is missing or undecodable are left out, counted and
listed at the end, or stop the conversion with `--strict`.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from data_tools.convert.common import ConvertOptions, SkipSample, add_common_args, convert, report
from vla_scale.data.format import FormatError, VLSample, decode_image

ROLES = ("human", "gpt")


@dataclass(frozen=True)
class Source:
    """One entry: its output key, image path and conversation (picklable, sent to a worker)."""

    index: int
    key: str
    image: str  # absolute path
    conversations: tuple[tuple[str, str], ...]  # (from, value)


def read_entries(path: Path) -> list:
    if not path.is_file():
        raise FormatError(f"{path} not found; SRC must be the LLaVA JSON file (a list of entries)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise FormatError(f"{path} is not valid JSON ({err}); SRC must be a LLaVA-style JSON list") from err
    if not isinstance(entries, list):
        raise FormatError(f"{path}: top level is {type(entries).__name__}, expected a list of entries")
    return entries


def check_conversation(entry: dict, where: str) -> tuple[tuple[str, str], ...]:
    """Turns as (from, value) pairs; a malformed conversation stops the run with where it is."""
    turns = entry.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise FormatError(f"{where}: 'conversations' must be a non-empty list of {{'from', 'value'}} turns")
    out = []
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise FormatError(f"{where}: turn {j} must be {{'from': 'human'|'gpt', 'value': str}}, not {turn!r:.120}")
        out.append((turn["from"], turn["value"]))
    return tuple(out)


def list_sources(entries: list, image_folder: Path) -> tuple[list[Source], int]:
    """Sources for entries with one image, and how many entries had none or several."""
    sources: list[Source] = []
    unsupported = 0
    for i, entry in enumerate(entries):
        where = f"entry {i}" + (f" (id {entry.get('id')!r})" if isinstance(entry, dict) and "id" in entry else "")
        if not isinstance(entry, dict):
            raise FormatError(f"{where}: expected an object with 'image' and 'conversations', not {entry!r:.80}")
        image = entry.get("image")
        if not isinstance(image, str) or not image:
            unsupported += 1
            continue
        turns = check_conversation(entry, where)
        safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", str(entry.get("id", "")))[:64]
        key = f"{i:09d}_{safe_id}" if safe_id else f"{i:09d}"
        sources.append(Source(i, key, str(image_folder / image), turns))
    return sources, unsupported


def load_sample(src: Source, strict: bool) -> VLSample:
    """Decode one image (runs in a worker process); a bad image is skipped, or fatal with --strict."""
    path = Path(src.image)
    problem = ""
    if not path.is_file():
        problem = "image not found"
    else:
        try:
            data = path.read_bytes()
            decode_image(data)  # readable? (the writer copies JPEG/PNG/WebP files as they are)
        except FormatError as err:  # the name only: PIL's message holds a memory address, the manifest must not
            problem = f"undecodable image ({type(err.__cause__ or err).__name__})"
        except OSError as err:
            problem = f"unreadable ({err.strerror or type(err).__name__})"
    if problem:
        message = f"entry {src.index} ({src.key}): {path}: {problem}"
        if strict:
            raise FormatError(f"{message}; fix the file or --image-folder, or drop --strict to skip such entries")
        raise SkipSample(message)
    conversations = [{"from": who, "value": value} for who, value in src.conversations]
    return VLSample(key=src.key, image=data, conversations=conversations)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert llava`."""
    p = subparsers.add_parser(
        "llava",
        help="a LLaVA-style JSON list plus its image folder (vision-language data)",
        description=__doc__.splitlines()[0],
    )
    add_common_args(p, robot=False)
    p.add_argument(
        "--image-folder", default=None, help="folder the 'image' paths are relative to (default: the JSON's folder)"
    )
    p.add_argument("--strict", action="store_true", help="stop at the first missing or undecodable image")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions.from_args(args)
    src = Path(opts.src)
    folder = Path(args.image_folder) if args.image_folder else src.parent
    if not folder.is_dir():
        raise FormatError(f"--image-folder {folder} is not a folder; point it at the images the JSON refers to")
    entries = read_entries(src)
    sources, unsupported = list_sources(entries, folder.resolve())
    if not sources:
        raise FormatError(f"{src}: none of the {len(entries)} entries has a single 'image'; nothing to convert")
    settings = {"format": "llava", "image_folder": str(folder.resolve()), "strict": args.strict}
    extra = {"text_only_or_multi_image_entries": unsupported}
    manifest = convert(sources, partial(load_sample, strict=args.strict), opts, src.stem, settings, extra, kind="vl")
    report(manifest, opts.out)
    if unsupported:
        print(f"left out {unsupported} entries without a single image (text-only or multi-image)")
    return 0
