"""The on-disk dataset format, defined once for the writers (`data_tools`) and the reader.

A dataset is a folder with:
- `shard-NNNNNN.tar` webdataset shards;
- `manifest.json` (`Manifest`): kind, schema version, shards with sample counts;
- `stats.json` (robot only): per-dimension statistics of `action` and `state`.

Robot sample = one episode, so windows are cut on the reader side without storing
frames twice. Its tar members share the key `<episode key>`:
- `meta.json`: `{"instruction": str, "length": L, "cameras": [...], ...}`
- `action.npy`: float32 `[L, A]` in the robot's units; which dimensions are binary grippers and how the
  others are normalised is declared in the manifest (`spaces`, see `vla_scale.data.spaces`)
- `state.npy`: float32 `[L, S]`
- `<camera>.<t:04d>.<jpg|png|webp>`: one compressed frame per step and camera; the
  extension per camera is `meta["image_exts"][camera]` (older shards: `meta["image_ext"]`)
  and how it was made `meta["image_encoding"][camera]` (see `encode_camera`)

VL sample = one image and one LLaVA-style conversation:
- `jpg` / `png` / `webp`: the image
- `json`: `{"conversations": [{"from": "human", "value": "<image>\\n..."},
  {"from": "gpt", "value": "..."}, ...], "image_encoding": "png"}` (how the image was stored)

Arrays are `.npy` read with `allow_pickle=False`; no pickle anywhere.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np

from vla_scale.data.errors import FormatError
from vla_scale.data.images import (  # noqa: F401 - the image codec is part of the format's public names
    IMAGE_ENCODINGS,
    IMAGE_EXTS,
    JPEG_QUALITY,
    decode_image,
    encode_camera,
    encode_image,
    image_format,
)
from vla_scale.data.locations import RemoteFile, dataset_file
from vla_scale.data.spaces import Spaces

SCHEMA_VERSION = 1
STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


@dataclass
class Episode:
    """One robot episode in memory: what a converter produces and the reader yields."""

    key: str
    instruction: str
    action: np.ndarray  # float32 [L, A]
    state: np.ndarray  # float32 [L, S]
    # camera -> L frames: uint8 [H, W, 3] pixels, or a source's compressed file bytes (JPEG/PNG/WebP), which
    # the writer copies unchanged where the chosen encoding allows (`encode_camera`); decoded episodes hold pixels.
    frames: dict[str, list[np.ndarray | bytes]]
    meta: dict = field(default_factory=dict)  # extra metadata kept verbatim

    @property
    def length(self) -> int:
        return int(self.action.shape[0])


@dataclass
class VLSample:
    """One image + LLaVA-style conversation."""

    key: str
    image: np.ndarray | bytes  # uint8 [H, W, 3], or compressed source bytes (written as `Episode` frames are)
    conversations: list[dict]


@dataclass
class ShardInfo:
    path: str  # relative to the dataset folder
    samples: int
    frames: int = 0  # robot: total steps in the shard
    max_length: int = 0  # robot: steps of its longest episode (0: not recorded, by an older writer)

    def longest_episode(self) -> int:
        """Robot: the longest episode's length, or an upper bound when not recorded (each episode has >= 1 step)."""
        return self.max_length or max(self.frames - self.samples + 1, 0)


@dataclass
class Manifest:
    """What a dataset folder holds; written last, so its presence means the dataset is complete."""

    name: str
    kind: Literal["robot", "vl"]
    shards: list[ShardInfo]
    schema_version: int = SCHEMA_VERSION
    cameras: list[str] = field(default_factory=list)
    action_dim: int = 0
    state_dim: int = 0
    image_size: list[int] = field(default_factory=list)  # [H, W]
    extra: dict = field(default_factory=dict)
    # camera (VL: "image") -> how its frames are stored, e.g. "png", "jpg (source bytes)", "jpg q95 4:4:4"
    image_encoding: dict[str, str] = field(default_factory=dict)
    # robot: the declared action/state spaces (`Spaces.to_json`); {} = legacy layout (last dims binary, mean/std)
    spaces: dict = field(default_factory=dict)

    @property
    def robot_spaces(self) -> Spaces:
        """The declared action and state spaces (the legacy layout when the manifest declares none)."""
        return Spaces.from_json(self.spaces, self.action_dim, self.state_dim, "manifest.json: spaces")

    @property
    def num_samples(self) -> int:
        return sum(s.samples for s in self.shards)

    def save(self, folder: str | Path) -> None:
        data = asdict(self)
        tmp = Path(folder) / "manifest.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(Path(folder) / "manifest.json")

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = dataset_file(folder, "manifest.json")  # a Path, or a file at an s3://, http(s):// or pipe: location
        if not path.is_file():
            raise FormatError(
                f"{path} not found: {folder} is not a vla_scale dataset "
                "(write one with `python -m data_tools synth` or a converter)"
            )
        data = _read_json(path, "re-convert the dataset (a converter writes manifest.json last)")
        if not isinstance(data, dict):
            raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}; re-convert the dataset")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise FormatError(
                f"{path}: schema_version {version} is not supported (this vla_scale reads "
                f"{SCHEMA_VERSION}); re-convert the dataset with this version of data_tools"
            )
        try:
            data["shards"] = [ShardInfo(**s) for s in data["shards"]]
            manifest = cls(**data)
        except (KeyError, TypeError) as err:
            raise FormatError(f"{path}: not a dataset manifest ({err}); re-convert the dataset") from err
        for shard in manifest.shards:  # tools write files at these paths: none may leave the dataset folder
            if not is_safe_rel(shard.path):
                raise FormatError(f"{path}: shard path {shard.path!r} is absolute or has a '..'; fix the manifest")
        if manifest.kind == "robot":
            try:
                manifest.robot_spaces  # noqa: B018 - checked on read: a bad declaration fails here, not in the ranks
            except FormatError as err:
                raise FormatError(f"{path}: {err}; fix the declaration or re-convert the dataset") from err
        return manifest


def is_safe_rel(rel: object) -> bool:
    """True for a non-empty relative path without `..` (a manifest from a remote server must not name /etc/...)."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    return p is not None and rel.strip() != "" and not p.is_absolute() and ".." not in p.parts


def load_stats(folder: str | Path) -> dict[str, dict[str, np.ndarray]]:
    """Read stats.json as `{"action": {"mean": array, ...}, "state": {...}}`."""
    path = dataset_file(folder, "stats.json")
    if not path.is_file():
        raise FormatError(f"{path} not found: robot datasets need stats.json (run `python -m data_tools stats`)")
    raw = _read_json(path, "recompute it with `python -m data_tools stats`")
    fix = "recompute it with `python -m data_tools stats` (its arrays must hold finite numbers)"
    if not isinstance(raw, dict) or not all(isinstance(raw.get(k), dict) for k in ("action", "state")):
        raise FormatError(f"{path}: expected {{'action': {{...}}, 'state': {{...}}}}; {fix}")
    stats: dict[str, dict[str, np.ndarray]] = {}
    for name, values in raw.items():
        stats[name] = {}
        for stat in STAT_KEYS:
            try:
                arr = np.asarray(values[stat], dtype=np.float32)
            except KeyError:
                raise FormatError(f"{path}: {name}.{stat} is missing; {fix}") from None
            except (TypeError, ValueError) as err:
                raise FormatError(f"{path}: {name}.{stat} is not a list of numbers ({err}); {fix}") from err
            bad = np.flatnonzero(~np.isfinite(arr)) if arr.ndim == 1 else []
            if arr.ndim != 1 or len(bad):
                what = f"{arr[bad[0]]} at dimension {int(bad[0])}" if len(bad) else f"shape {arr.shape}"
                raise FormatError(f"{path}: {name}.{stat} has {what}; {fix}")
            stats[name][stat] = arr
    return stats


def _read_json(path: Path | RemoteFile, fix: str) -> object:
    """JSON from `path`; a file that is not JSON names itself (and the line) instead of a bare JSONDecodeError."""
    try:
        return json.loads(path.read_text())
    except UnicodeDecodeError as err:
        raise FormatError(f"{path} is not JSON (not UTF-8 text at byte {err.start}); {fix}") from None
    except ValueError as err:
        raise FormatError(f"{path} is not JSON ({err}); {fix}") from None


def compute_stats(arrays: list[np.ndarray]) -> dict[str, list[float]]:
    """Per-dimension statistics over the concatenation of `[L, D]` arrays."""
    x = np.concatenate(arrays, axis=0).astype(np.float64)
    return {
        "mean": x.mean(0).tolist(),
        "std": x.std(0).tolist(),
        "min": x.min(0).tolist(),
        "max": x.max(0).tolist(),
        "q01": np.quantile(x, 0.01, axis=0).tolist(),
        "q99": np.quantile(x, 0.99, axis=0).tolist(),
    }


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise FormatError(f"unreadable .npy ({err})") from err


def encode_episode(ep: Episode, image_ext: str = "auto", quality: int = JPEG_QUALITY) -> dict[str, bytes | str]:
    """Episode → webdataset sample dict (for `webdataset.TarWriter.write`); `image_ext` as in `encode_camera`."""
    if ep.action.ndim != 2 or ep.state.ndim != 2 or ep.state.shape[0] != ep.length:
        raise FormatError(f"episode {ep.key}: action [L, A] and state [L, S] must share L")
    exts, encodings, members = {}, {}, {}
    for cam in sorted(ep.frames):
        frames = ep.frames[cam]
        if len(frames) != ep.length:
            raise FormatError(f"episode {ep.key}: camera {cam} has {len(frames)} frames, expected {ep.length}")
        try:
            exts[cam], encodings[cam], data = encode_camera(frames, image_ext, quality)
        except FormatError as err:
            raise FormatError(f"episode {ep.key}: camera {cam}: {err}") from err
        members.update((f"{cam}.{t:04d}.{exts[cam]}", d) for t, d in enumerate(data))
    meta = dict(ep.meta)
    meta.update(instruction=ep.instruction, length=ep.length, cameras=sorted(ep.frames))
    # image_ext: the first camera's, for readers of shards from before per-camera extensions
    meta.update(image_ext=next(iter(exts.values()), "png"), image_exts=exts, image_encoding=encodings)
    sample: dict[str, bytes | str] = {
        "__key__": ep.key,
        "meta.json": json.dumps(meta).encode(),
        "action.npy": encode_npy(ep.action.astype(np.float32)),
        "state.npy": encode_npy(ep.state.astype(np.float32)),
    }
    return {**sample, **members}


def decode_episode_arrays(sample: dict) -> tuple[dict, np.ndarray, np.ndarray]:
    """meta, action `[L, A]` and state `[L, S]` of a raw robot sample, checked; frames stay compressed.

    Cheap (JSON and two small arrays), so readers can validate and count windows of an
    episode without decoding a single image.
    """
    key = sample.get("__key__", "?")
    try:
        meta = json.loads(sample["meta.json"])
    except KeyError:
        raise FormatError(f"sample {key}: no meta.json (not a robot episode)") from None
    except ValueError as err:
        raise FormatError(f"sample {key}: meta.json is not JSON ({err})") from err
    if not isinstance(meta, dict):
        raise FormatError(f"sample {key}: meta.json is a JSON {type(meta).__name__}, not an object")
    for name in ("action.npy", "state.npy"):
        if name not in sample:
            raise FormatError(f"sample {key}: missing {name}")
    action = decode_npy(sample["action.npy"]).astype(np.float32)
    state = decode_npy(sample["state.npy"]).astype(np.float32)
    length = int(meta.get("length", action.shape[0]))
    if action.ndim != 2 or state.ndim != 2:
        raise FormatError(f"sample {key}: action {action.shape} and state {state.shape} must be [L, D]")
    if action.shape[0] != length or state.shape[0] != length:
        raise FormatError(f"sample {key}: action/state length {action.shape[0]}/{state.shape[0]} != {length}")
    if not (np.isfinite(action).all() and np.isfinite(state).all()):
        raise FormatError(f"sample {key}: NaN or infinite values in action or state")
    return meta, action, state


def frame_name(meta: dict, camera: str, t: int) -> str:
    """Tar member suffix of frame `t` of `camera` (per-camera extension; older shards have one for all)."""
    ext = (meta.get("image_exts") or {}).get(camera) or meta.get("image_ext", "jpg")
    return f"{camera}.{t:04d}.{ext}"


def decode_frame(sample: dict, meta: dict, camera: str, t: int) -> np.ndarray:
    """Frame `t` of `camera` in a raw robot sample → uint8 `[H, W, 3]`."""
    name = frame_name(meta, camera, t)
    if name not in sample:
        raise FormatError(f"sample {sample.get('__key__', '?')}: missing frame {name}")
    try:
        return decode_image(sample[name])
    except FormatError as err:
        raise FormatError(f"sample {sample.get('__key__', '?')}: {name}: {err}") from err


def decode_episode(sample: dict) -> Episode:
    """webdataset sample dict (raw bytes) → Episode with every frame decoded; raises FormatError."""
    meta, action, state = decode_episode_arrays(sample)
    frames = {
        cam: [decode_frame(sample, meta, cam, t) for t in range(action.shape[0])] for cam in meta.get("cameras", [])
    }
    own = ("instruction", "length", "cameras", "image_ext", "image_exts", "image_encoding")
    extra = {k: v for k, v in meta.items() if k not in own}
    return Episode(sample.get("__key__", "?"), meta.get("instruction", ""), action, state, frames, extra)


def encode_vl(sample: VLSample, image_ext: str = "auto", quality: int = JPEG_QUALITY) -> dict[str, bytes | str]:
    """VLSample → webdataset sample dict; the image is stored as `encode_camera` stores a frame."""
    try:
        ext, encoding, (data,) = encode_camera([sample.image], image_ext, quality)
    except FormatError as err:
        raise FormatError(f"sample {sample.key}: {err}") from err
    return {
        "__key__": sample.key,
        ext: data,
        "json": json.dumps({"conversations": sample.conversations, "image_encoding": encoding}).encode(),
    }


def decode_vl(sample: dict) -> VLSample:
    key = sample.get("__key__", "?")
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None or "json" not in sample:
        raise FormatError(f"sample {key}: a VL sample needs an image (jpg/png/webp) and a json conversation")
    try:
        conv = json.loads(sample["json"])["conversations"]
    except (ValueError, KeyError, TypeError) as err:
        raise FormatError(f"sample {key}: json has no 'conversations' list ({err})") from err
    if not isinstance(conv, list) or not all(isinstance(turn, dict) for turn in conv):
        raise FormatError(
            f"sample {key}: json 'conversations' must be a list of {{'from': ..., 'value': ...}} turns, "
            f"got {type(conv).__name__}"
        )
    try:
        image = decode_image(sample[ext])
    except FormatError as err:
        raise FormatError(f"sample {key}: {ext}: {err}") from err
    return VLSample(key, image, conv)
