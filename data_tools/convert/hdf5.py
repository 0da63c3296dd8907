"""`python -m data_tools convert hdf5 SRC OUT`: robomimic / LIBERO or ALOHA HDF5 files.

Two layouts, read with h5py (SRC is one .hdf5/.h5 file or a folder of them, natural order):
- robomimic (also LIBERO): `data/demo_N/obs/<key>` and `data/demo_N/actions` [L, A], many
  demos per file (sorted by N). The instruction comes from `--instruction`, else from the
  `data` attributes (`problem_info` / `env_args` JSON, LIBERO writes one per file).
- aloha: one episode per file (`episode_N.hdf5`): `observations/images/<cam>`,
  `observations/qpos`, `action`. Images are uint8 [L, H, W, 3] or, in files recorded with
  `compress`, one JPEG per row (zero-padded uint8 [L, N] or variable-length); those JPEGs are
  passed on as bytes (padding stripped), so `--image-ext auto`/`jpg` copies them unchanged
  (`--flip-images` decodes them to rotate the pixels).
The layout is detected from the first file unless `--layout` is given.
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from data_tools.convert.common import ConvertOptions, add_common_args, convert, parse_cameras, report
from data_tools.space_choice import add_space_args, space_choice
from vla_scale.data.format import Episode, FormatError, decode_image, image_format

LAYOUTS = ("robomimic", "aloha")
SUFFIXES = (".hdf5", ".h5")
# Candidate source keys per output camera / state, first fully present one wins (robomimic, then LIBERO names).
ROBOMIMIC_CAMERAS = {
    "rgb_static": ("agentview_image", "agentview_rgb"),
    "rgb_wrist": ("robot0_eye_in_hand_image", "eye_in_hand_rgb"),
}
ROBOMIMIC_STATES = (
    ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos"),
    ("ee_pos", "ee_ori", "gripper_states"),
)
ALOHA_CAMERAS = {"rgb_static": ("cam_high", "top", "angle"), "rgb_wrist": ("cam_left_wrist", "left_wrist")}


@dataclass(frozen=True)
class Keys:
    """Dataset paths inside an episode group, the same for every episode of a run."""

    cameras: tuple[tuple[str, str], ...]  # (output camera, path)
    state: tuple[str, ...]
    action: str
    flip: bool


@dataclass(frozen=True)
class Source:
    """One episode: file, group inside it, output key and instruction; small and picklable."""

    path: str
    group: str  # "data/demo_3" (robomimic) or "" (aloha: the whole file)
    key: str
    instruction: str


def natural_key(text: str) -> list:
    """'demo_10' after 'demo_9': digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def safe_key(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def list_files(src: Path) -> list[Path]:
    if src.is_file():
        return [src]
    files = sorted(
        (p for p in src.glob("*") if p.suffix in SUFFIXES and p.is_file()), key=lambda p: natural_key(p.name)
    )
    if not files:
        raise FormatError(f"{src}: no .hdf5 / .h5 files; point SRC at an HDF5 file or a folder holding them")
    return files


def detect_layout(path: Path) -> str:
    with h5py.File(path, "r") as f:
        if isinstance(f.get("data"), h5py.Group):
            return "robomimic"
        if isinstance(f.get("observations"), h5py.Group) and "action" in f:
            return "aloha"
        top = sorted(f.keys())
    raise FormatError(
        f"{path}: neither robomimic (data/demo_N) nor ALOHA (observations/, action) layout; its top keys are {top}"
    )


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def file_instruction(attrs: h5py.AttributeManager) -> str:
    """A language instruction stored in the `data` group attributes, or ""."""
    if "language_instruction" in attrs:
        return _text(attrs["language_instruction"])
    for name in ("problem_info", "env_args"):
        if name not in attrs:
            continue
        try:
            info = json.loads(_text(attrs[name]))
        except ValueError:
            continue
        text = info.get("language_instruction") or (info.get("env_kwargs") or {}).get("language_instruction")
        if text:
            return " ".join(text) if isinstance(text, list) else str(text)
    return ""


def _first_present(group: h5py.Group, candidates: dict[str, tuple[str, ...]], prefix: str) -> dict[str, str]:
    return {
        name: next(k for k in keys if f"{prefix}{k}" in group)
        for name, keys in candidates.items()
        if any(f"{prefix}{k}" in group for k in keys)
    }


def resolve_keys(group: h5py.Group, layout: str, args: argparse.Namespace, where: str) -> Keys:
    """Turn the options (or the defaults) into dataset paths and check them against the first episode."""
    prefix = "obs/" if layout == "robomimic" else "observations/"
    cam_prefix = "obs/" if layout == "robomimic" else "observations/images/"
    defaults = _first_present(group, ROBOMIMIC_CAMERAS if layout == "robomimic" else ALOHA_CAMERAS, cam_prefix)
    cameras = parse_cameras(args.camera or [], defaults)
    images = sorted(k for k, v in group.get(cam_prefix.rstrip("/"), {}).items() if _is_image(v))
    if not cameras:
        raise FormatError(
            f"{where}: none of the default cameras is there; add --camera rgb_static=KEY, KEY in {images}"
        )
    if args.state_keys:
        state = tuple(k.strip() for k in args.state_keys.split(",") if k.strip())
    elif layout == "aloha":
        state = ("qpos",)
    else:
        state = next((s for s in ROBOMIMIC_STATES if all(f"obs/{k}" in group for k in s)), ())
    lowdim = sorted(k for k, v in group.get(prefix.rstrip("/"), {}).items() if isinstance(v, h5py.Dataset))
    if not state:
        raise FormatError(f"{where}: no default state keys there; choose with --state-keys from {lowdim}")
    action = args.action_key or ("actions" if layout == "robomimic" else "action")
    keys = Keys(
        cameras=tuple((name, f"{cam_prefix}{key}") for name, key in cameras.items()),
        state=tuple(f"{prefix}{k}" for k in state),
        action=action,
        flip=args.flip_images,
    )
    for name, path in keys.cameras:
        if not _is_image(group.get(path)):
            raise FormatError(f"--camera {name}={path[len(cam_prefix) :]}: not an image dataset in {where}; {images}")
    for path in keys.state:
        if not isinstance(group.get(path), h5py.Dataset):
            raise FormatError(f"--state-keys: {path[len(prefix) :]!r} is not in {where}; choose from {lowdim}")
    if not isinstance(group.get(action), h5py.Dataset):
        raise FormatError(f"--action-key {action!r} is not a dataset in {where}; its keys are {sorted(group)}")
    return keys


def _is_image(obj: object) -> bool:
    """uint8 [L, H, W, 3] frames, or one JPEG per row (uint8 [L, N] padded, or variable-length)."""
    if not isinstance(obj, h5py.Dataset):
        return False
    if h5py.check_vlen_dtype(obj.dtype) is not None:
        return obj.ndim == 1
    return obj.dtype == np.uint8 and (obj.ndim == 2 or (obj.ndim == 4 and obj.shape[-1] == 3))


def check_episode(group: h5py.Group, keys: Keys, where: str) -> None:
    """Every key present with one row per step, so bad files fail before any work starts."""
    if not isinstance(group.get(keys.action), h5py.Dataset):
        raise FormatError(f"{where}: no {keys.action!r} dataset (the first episode has one); is the file complete?")
    length = group[keys.action].shape[0]
    for path in (*keys.state, *(p for _, p in keys.cameras)):
        obj = group.get(path)
        if not isinstance(obj, h5py.Dataset) or obj.shape[0] != length:
            got = obj.shape if isinstance(obj, h5py.Dataset) else "missing"
            raise FormatError(f"{where}: {path!r} is {got}, expected {length} rows like {keys.action!r}")


def list_sources(files: list[Path], layout: str, args: argparse.Namespace) -> tuple[list[Source], Keys]:
    """One Source per demo (robomimic) or file (aloha), in order; keys resolved on the first episode."""
    sources: list[Source] = []
    keys: Keys | None = None
    many = len(files) > 1
    for path in files:
        with h5py.File(path, "r") as f:
            if layout == "aloha":
                if not isinstance(f.get("observations"), h5py.Group):
                    raise FormatError(
                        f"{path}: no 'observations' group; is it an ALOHA file? (or pass --layout robomimic)"
                    )
                groups, instruction = [("", safe_key(path.stem))], args.instruction or ""
            else:
                groups, instruction = _robomimic_demos(f, path, args, many)
            if not instruction:
                raise FormatError(f"{path}: {_missing_instruction(f, layout)}; pass --instruction 'TEXT'")
            for group, key in groups:
                where = f"{path}:/{group}"
                if keys is None:
                    keys = resolve_keys(f[group or "/"], layout, args, where)
                check_episode(f[group or "/"], keys, where)
                sources.append(Source(str(path), group, key, instruction))
    if keys is None:
        raise FormatError(f"{files[0].parent}: no episodes found in {len(files)} HDF5 files")
    return sources, keys


def _robomimic_demos(f: h5py.File, path: Path, args: argparse.Namespace, many: bool) -> tuple[list, str]:
    data = f.get("data")
    if not isinstance(data, h5py.Group):
        raise FormatError(f"{path}: no 'data' group; is it a robomimic file? (or pass --layout aloha)")
    demos = sorted((k for k in data if isinstance(data[k], h5py.Group)), key=natural_key)
    if args.filter_key:
        mask = f.get(f"mask/{args.filter_key}")
        if mask is None:
            have = sorted(f["mask"]) if "mask" in f else []
            raise FormatError(f"{path}: --filter-key {args.filter_key!r} not in mask/ (available: {have})")
        wanted = {_text(v) for v in mask[()]}
        demos = [d for d in demos if d in wanted]
    prefix = f"{safe_key(path.stem)}_" if many else ""
    return [(f"data/{d}", prefix + safe_key(d)) for d in demos], args.instruction or file_instruction(data.attrs)


def _missing_instruction(f: h5py.File, layout: str) -> str:
    if layout == "aloha":
        return "ALOHA files hold no language instruction"
    env = ""
    if "data" in f and "env_args" in f["data"].attrs:
        try:
            env = f" (env {json.loads(_text(f['data'].attrs['env_args'])).get('env_name')!r})"
        except ValueError:
            pass
    return f"no language instruction in the data attributes{env}"


def jpeg_rows(data: np.ndarray) -> list[bytes]:
    """One JPEG file per row: zero padding after the end-of-image marker (FF D9) is cut off."""
    rows = [np.asarray(row, dtype=np.uint8).tobytes() for row in data]
    return [row.rstrip(b"\0") if row.rstrip(b"\0").endswith(b"\xff\xd9") else row for row in rows]


def read_frames(ds: h5py.Dataset, flip: bool) -> list[np.ndarray | bytes]:
    """uint8 [L, H, W, 3] as is; JPEG rows (zero-padded or variable-length) as file bytes, decoded only to flip."""
    data = ds[()]
    if data.ndim == 4:
        frames = list(data)
        return [np.ascontiguousarray(img[::-1, ::-1]) for img in frames] if flip else frames
    rows = jpeg_rows(data)
    try:
        if any(image_format(row) is None for row in rows):
            raise FormatError("a row is not an image file")
        if not flip:
            return rows  # the writer decodes them once to prove them readable, then copies or re-encodes
        decoded = [decode_image(row) for row in rows]
    except FormatError as err:
        raise FormatError(f"{ds.file.filename}:{ds.name}: {err}; is it a compressed (JPEG) image dataset?") from err
    return [np.ascontiguousarray(img[::-1, ::-1]) for img in decoded]


def matrix(group: h5py.Group, paths: tuple[str, ...], where: str) -> np.ndarray:
    """Concatenate [L, ...] datasets into float32 [L, D]."""
    parts = []
    for path in paths:
        arr = group[path][()]
        if not np.issubdtype(arr.dtype, np.number) and arr.dtype != np.bool_:
            raise FormatError(f"{where}: {path!r} holds {arr.dtype}, not numbers; choose a numeric key")
        parts.append(arr.astype(np.float32).reshape(arr.shape[0], -1))
    return np.concatenate(parts, axis=1)


def load_episode(src: Source, keys: Keys, layout: str) -> Episode:
    """Read one demo / file (runs in a worker process)."""
    where = f"{src.path}:/{src.group}"
    with h5py.File(src.path, "r") as f:
        group = f[src.group or "/"]
        frames = {name: read_frames(group[path], keys.flip) for name, path in keys.cameras}
        action = matrix(group, (keys.action,), where)
        state = matrix(group, keys.state, where)
        meta = {"source_format": "hdf5", "layout": layout, "file": Path(src.path).name}
        if src.group:
            meta["group"] = src.group
        if layout == "aloha" and "sim" in f.attrs:
            meta["sim"] = bool(f.attrs["sim"])
    return Episode(key=src.key, instruction=src.instruction, action=action, state=state, frames=frames, meta=meta)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools convert hdf5`."""
    p = subparsers.add_parser(
        "hdf5",
        help="robomimic / LIBERO or ALOHA HDF5 files",
        description=__doc__.splitlines()[0]
        + " Default cameras: robomimic agentview_image (LIBERO agentview_rgb) → rgb_static, "
        "robot0_eye_in_hand_image (eye_in_hand_rgb) → rgb_wrist; ALOHA cam_high → rgb_static, "
        "cam_left_wrist → rgb_wrist. --camera keys are obs keys (robomimic) or camera names (ALOHA).",
    )
    add_common_args(p)
    p.add_argument("--layout", choices=LAYOUTS, default=None, help="(default: detected from the first file)")
    p.add_argument("--instruction", default=None, help="instruction for every episode (required for ALOHA)")
    p.add_argument(
        "--state-keys",
        default=None,
        help="comma-separated obs keys to concatenate (default: robot0_eef_pos,robot0_eef_quat,robot0_gripper_qpos, "
        "LIBERO ee_pos,ee_ori,gripper_states; ALOHA qpos, relative to observations/)",
    )
    p.add_argument("--action-key", default=None, help="(default: actions for robomimic, action for ALOHA)")
    p.add_argument("--filter-key", default=None, help="robomimic: only the demos listed in mask/<KEY>, e.g. train")
    p.add_argument(
        "--flip-images", action="store_true", help="rotate frames by 180° (robosuite / LIBERO render upside down)"
    )
    add_space_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    opts = ConvertOptions.from_args(args)
    src = Path(opts.src)
    if not src.exists():
        raise FormatError(f"{src} does not exist; point SRC at an HDF5 file or a folder of them")
    files = list_files(src)
    layout = args.layout or detect_layout(files[0])
    if layout == "aloha" and args.filter_key:
        raise ValueError("--filter-key applies to robomimic files only; drop it for ALOHA")
    sources, keys = list_sources(files, layout, args)
    settings = {
        "format": "hdf5",
        "layout": layout,
        "cameras": dict(keys.cameras),
        "state": list(keys.state),
        "action": keys.action,
        "flip": keys.flip,
        "instruction": args.instruction,
        "filter_key": args.filter_key,
    }
    name = safe_key(src.stem if src.is_file() else src.resolve().name)
    load = partial(load_episode, keys=keys, layout=layout)
    manifest = convert(sources, load, opts, name, settings, spaces=space_choice(args))
    report(manifest, opts.out)
    return 0
