"""`python -m data_tools convert rlds SRC OUT`: an RLDS / TFDS dataset (e.g. Open X-Embodiment).

Read without TensorFlow (see `data_tools.tfrecord`). SRC is the `<name>/<version>` folder
with `dataset_info.json`, `features.json` and `<name>-<split>.tfrecord-NNNNN-of-NNNNN`
files (or `<name>` holding one such version folder). One record = one episode; nested
keys are joined with '/' (`steps/action`, `steps/observation/image`), every step's values
concatenated, so float arrays are reshaped by the feature shape from features.json (or
by the step count, which is `len(steps/is_first)`). Images are JPEG/PNG bytes per step,
passed on as bytes (copied into the shards unchanged under `--image-ext auto` / a matching one).
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from data_tools.convert.common import ConvertOptions, add_common_args, convert, parse_cameras, report
from data_tools.space_choice import add_space_args, space_choice
from data_tools.tfrecord import Value, parse_example, read_record, record_offsets
from vla_scale.data.format import Episode, FormatError

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


@dataclass(frozen=True)
class Keys:
    """Resolved source keys, checked against the first record before any work starts."""

    cameras: tuple[tuple[str, str], ...]  # (output camera, source key)
    state: tuple[str, ...]  # concatenated along the last dimension
    action: tuple[str, ...]
    instruction: str  # "" = no instruction
    shapes: tuple[tuple[str, tuple[int, ...]], ...]  # per-step shapes from features.json


def find_version_dir(src: Path) -> Path:
    """SRC itself if it holds dataset_info.json, else its newest `X.Y.Z` subfolder that does."""
    if (src / "dataset_info.json").is_file() or list(src.glob("*.tfrecord*")):
        return src
    versions = sorted(
        (p for p in src.iterdir() if p.is_dir() and _VERSION_RE.match(p.name) and (p / "dataset_info.json").is_file()),
        key=lambda p: tuple(int(x) for x in p.name.split(".")),
    ) if src.is_dir() else []  # fmt: skip
    if not versions:
        raise FormatError(f"{src}: no dataset_info.json or *.tfrecord files; point SRC at the <name>/<version> folder")
    return versions[-1]


def feature_shapes(features: dict, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """`features.json` (TFDS FeaturesDict proto as JSON) → {'steps/action': (7,), ...} per step."""
    shapes: dict[str, tuple[int, ...]] = {}
    if "featuresDict" in features:
        for name, sub in features["featuresDict"].get("features", {}).items():
            shapes.update(feature_shapes(sub, f"{prefix}{name}/"))
    elif "sequence" in features:
        shapes.update(feature_shapes(features["sequence"].get("feature", {}), prefix))
    else:
        for kind in ("tensor", "image"):
            if kind in features:
                dims = features[kind].get("shape", {}).get("dimensions", [])
                shapes[prefix.rstrip("/")] = tuple(int(d) for d in dims)
    return shapes


def list_files(root: Path, split: str) -> list[Path]:
    files = sorted(root.glob(f"*-{split}.tfrecord*"))
    if not files:
        splits = sorted({m.group(1) for p in root.glob("*.tfrecord*") if (m := re.search(r"-(\w+)\.tfrecord", p.name))})
        raise FormatError(f"{root}: no tfrecord files for split {split!r}; available splits: {splits}; pass --split")
    return files


def _resolve(example: dict[str, Value], key: str, option: str) -> str:
    """Accept keys with or without the 'steps/' prefix; a clear error lists what there is."""
    for candidate in (key, f"steps/{key}"):
        if candidate in example:
            return candidate
    raise FormatError(f"{option}: key {key!r} is not in the records; change it to one of {sorted(example)}")


def resolve_keys(example: dict[str, Value], args: argparse.Namespace, shapes: dict) -> Keys:
    default = {"rgb_static": args.image_key}
    if args.wrist_image_key and _has(example, args.wrist_image_key):
        default["rgb_wrist"] = args.wrist_image_key
    cameras = parse_cameras(args.camera or [], default)
    cams = tuple((name, _resolve(example, key, f"--camera {name}")) for name, key in cameras.items())
    state = tuple(_resolve(example, k, "--state-key") for k in args.state_key.split(","))
    action = tuple(_resolve(example, k, "--action-key") for k in args.action_key.split(","))
    instruction = _resolve(example, args.instruction_key, "--instruction-key") if args.instruction_key else ""
    used = {k for _, k in cams} | set(state) | set(action)
    return Keys(cams, state, action, instruction, tuple((k, v) for k, v in shapes.items() if k in used))


def _has(example: dict, key: str) -> bool:
    return key in example or f"steps/{key}" in example


def step_count(example: dict[str, Value], keys: Keys) -> int:
    if "steps/is_first" in example:
        return len(example["steps/is_first"])
    first = example[keys.action[0]]
    size = int(np.prod(dict(keys.shapes).get(keys.action[0], ()) or (1,)))
    return len(first) // size


def matrix(example: dict[str, Value], keys: tuple[str, ...], length: int, shapes: dict, where: str) -> np.ndarray:
    """Concatenate flat per-step arrays into float32 [L, D], checking sizes against features.json."""
    parts = []
    for key in keys:
        flat = example[key]
        if isinstance(flat, list):
            raise FormatError(f"{where}: {key!r} holds bytes, not numbers; choose a numeric key")
        shape = shapes.get(key)
        if shape is not None and all(d > 0 for d in shape) and flat.size != length * int(np.prod(shape)):
            raise FormatError(f"{where}: {key!r} has {flat.size} values, expected {length} steps x {shape}")
        if length == 0 or flat.size % length:
            raise FormatError(f"{where}: {key!r} has {flat.size} values, not a multiple of {length} steps")
        parts.append(flat.astype(np.float32).reshape(length, -1))
    return np.concatenate(parts, axis=1)


def load_episode(source: tuple[str, int, int], keys: Keys, split: str) -> Episode:
    """Read, check and decode one record (runs in a worker process)."""
    path, offset, index = source
    where = f"{path} record at byte offset {offset}"
    example = parse_example(read_record(path, offset))
    length = step_count(example, keys)
    shapes = dict(keys.shapes)
    frames: dict[str, list[np.ndarray]] = {}
    for cam, key in keys.cameras:
        images = example[key]
        if not isinstance(images, list) or len(images) != length:
            n = len(images)
            raise FormatError(f"{where}: {key!r} has {n} entries for {length} steps; is it an image key?")
        frames[cam] = list(images)  # file bytes: the writer copies or decodes them (`encode_camera`)
    instruction = ""
    if keys.instruction:
        texts = [t for t in example[keys.instruction] if isinstance(t, bytes) and t]
        instruction = texts[0].decode("utf-8") if texts else ""
    meta = {"source_format": "rlds", "split": split, "file": Path(path).name, "record_offset": offset}
    if isinstance(example.get("episode_metadata/file_path"), list) and example["episode_metadata/file_path"]:
        meta["file_path"] = example["episode_metadata/file_path"][0].decode("utf-8", "replace")
    return Episode(
        key=f"ep{index:06d}",
        instruction=instruction,
        action=matrix(example, keys.action, length, shapes, where),
        state=matrix(example, keys.state, length, shapes, where),
        frames=frames,
        meta=meta,
    )


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert rlds`."""
    p = subparsers.add_parser(
        "rlds",
        help="an RLDS / TFDS dataset folder (Open X-Embodiment), read without TensorFlow",
        description=__doc__.splitlines()[0],
    )
    add_common_args(p)
    p.add_argument("--split", default="train", help="(default: %(default)s)")
    p.add_argument("--image-key", default="steps/observation/image", help="→ rgb_static (default: %(default)s)")
    p.add_argument(
        "--wrist-image-key",
        default="steps/observation/wrist_image",
        help="→ rgb_wrist when present; '' for none (default: %(default)s)",
    )
    p.add_argument(
        "--state-key", default="steps/observation/state", help="comma-separated to concatenate (default: %(default)s)"
    )
    p.add_argument("--action-key", default="steps/action", help="comma-separated to concatenate (default: %(default)s)")
    p.add_argument("--instruction-key", default="steps/language_instruction", help="'' for none (default: %(default)s)")
    add_space_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions.from_args(args)
    root = find_version_dir(Path(opts.src))
    shapes: dict[str, tuple[int, ...]] = {}
    if (root / "features.json").is_file():
        shapes = feature_shapes(json.loads((root / "features.json").read_text()))
    sources = []
    for path in list_files(root, args.split):
        sources += [(str(path), offset, len(sources) + i) for i, offset in enumerate(record_offsets(path))]
    if not sources:
        raise FormatError(f"{root}: the {args.split!r} tfrecord files hold no records")
    first = parse_example(read_record(sources[0][0], sources[0][1]))
    keys = resolve_keys(first, args, shapes)
    name = root.parent.name if _VERSION_RE.match(root.name) else root.name
    settings = {
        "format": "rlds",
        "split": args.split,
        "cameras": dict(keys.cameras),
        "state": list(keys.state),
        "action": list(keys.action),
        "instruction": keys.instruction,
    }
    load = partial(load_episode, keys=keys, split=args.split)
    manifest = convert(sources, load, opts, name, settings, spaces=space_choice(args))
    report(manifest, opts.out)
    return 0
