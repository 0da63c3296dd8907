"""`ShardWriter`: the one way every converter writes a dataset folder.

Funnelling all converters through one writer keeps the on-disk contract of
`vla_scale.data.format` in one place: shard names, rotation, atomic shard files,
`stats.json`, and `manifest.json` written last so that its presence means "complete".
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile
from pathlib import Path
from types import TracebackType
from typing import Literal

import numpy as np
import webdataset as wds
from PIL import Image

from data_tools.space_choice import SpaceCheck, SpaceChoice
from vla_scale.data.format import (
    IMAGE_ENCODINGS,
    IMAGE_EXTS,
    JPEG_QUALITY,
    Episode,
    FormatError,
    Manifest,
    ShardInfo,
    Spaces,
    VLSample,
    compute_stats,
    decode_npy,
    encode_episode,
    encode_vl,
    frame_name,
)

SHARD_PATTERN = "shard-{:06d}.tar"
TAR_MTIME = 0.0  # fixed member mtime: the same input gives byte-identical shards
_TAR_BLOCK = 512
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-/]+$")


class DatasetWriteError(OSError):
    """The output folder cannot hold a new dataset (bad path, no permission, existing data)."""


def _tar_member_size(payload: int) -> int:
    """Bytes one member takes in a ustar archive: header block + payload padded to 512."""
    return _TAR_BLOCK + -(-payload // _TAR_BLOCK) * _TAR_BLOCK


def _image_size(data: bytes) -> tuple[int, int]:
    """[H, W] from an image header, without decoding the pixels."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            w, h = pil.size
    except Exception as err:  # PIL raises several types for corrupt data
        raise FormatError(f"undecodable image ({err})") from err
    return h, w


class ShardWriter:
    """Write samples into `shard-NNNNNN.tar` files of one dataset folder.

    A shard is closed after it holds `max_samples` samples or `max_bytes` bytes (either
    may be None); it is written as `<name>.tmp` and renamed once complete, so readers never
    see half a shard. `close()` writes `stats.json` (robot) and then `manifest.json`.
    Samples are written in call order, so the output is deterministic for the same input.

    Use as a context manager; on an exception the partial shard is removed and no
    manifest is written.

    `resume` continues an interrupted write: the listed complete shards (the first ones,
    in order) are kept and read back for keys and statistics, every other shard file is
    removed, and new samples go into the shards after them.
    """

    def __init__(
        self,
        out_dir: str | Path,
        name: str,
        kind: Literal["robot", "vl"],
        *,
        max_samples: int | None = None,
        max_bytes: int | None = 256 * 2**20,
        image_ext: str = "auto",
        jpeg_quality: int = JPEG_QUALITY,
        extra: dict | None = None,
        overwrite: bool = False,
        resume: list[ShardInfo] | None = None,
        spaces: Spaces | SpaceChoice | None = None,
    ) -> None:
        if kind not in ("robot", "vl"):
            raise ValueError(f"kind must be 'robot' or 'vl', not {kind!r}")
        if image_ext not in IMAGE_ENCODINGS:
            raise ValueError(f"image_ext {image_ext!r} not in {IMAGE_ENCODINGS}")
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, not {jpeg_quality}")
        if max_samples is not None and max_samples < 1:
            raise ValueError(f"max_samples must be >= 1 or None, not {max_samples}")
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1 or None, not {max_bytes}")
        self.out_dir = Path(out_dir)
        self.name = name
        self.kind = kind
        self.max_samples = max_samples
        self.max_bytes = max_bytes
        self.image_ext = image_ext
        self.jpeg_quality = jpeg_quality
        self.extra = dict(extra or {})
        # robot: the declared action/state spaces, checked on every episode; None writes no declaration (legacy)
        self._spaces = SpaceCheck(spaces) if spaces is not None and kind == "robot" else None
        self.shards: list[ShardInfo] = []
        self._prepare_dir(overwrite, keep=None if resume is None else [s.path for s in resume])

        self._file: io.BufferedWriter | None = None
        self._tar: wds.TarWriter | None = None
        self._tmp_path: Path | None = None
        self._shard_samples = 0
        self._shard_frames = 0
        self._shard_longest = 0
        self._shard_bytes = 0
        self._keys: set[str] = set()
        self._actions: list[np.ndarray] = []
        self._states: list[np.ndarray] = []
        self._cameras: list[str] | None = None
        self._action_dim = 0
        self._state_dim = 0
        self._sizes: set[tuple[int, int]] = set()
        self._encodings: dict[str, set[str]] = {}  # camera -> encodings seen (manifest.image_encoding)
        self._closed = False
        self.manifest: Manifest | None = None
        for info in resume or []:
            self._reload_shard(info)

    # -- setup --------------------------------------------------------------------------

    def _prepare_dir(self, overwrite: bool, keep: list[str] | None = None) -> None:
        """Create the folder, check it is writable and holds no other dataset (except shards in `keep`)."""
        where = self.out_dir
        if where.exists() and not where.is_dir():
            raise DatasetWriteError(f"{where} exists and is not a folder; choose another output path")
        try:
            where.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetWriteError(
                f"cannot create dataset folder {where}: {err.strerror or err}; choose another output path"
            ) from err
        old = sorted(where.glob("shard-*.tar")) + sorted(where.glob("shard-*.tar.tmp"))
        marker = [where / n for n in ("manifest.json", "stats.json") if (where / n).exists()]
        if keep:
            expected = [SHARD_PATTERN.format(i) for i in range(len(keep))]
            if keep != expected:
                raise ValueError(f"resume shards must be the first ones in order ({expected}), not {keep}")
            missing = [name for name in keep if not (where / name).is_file()]
            if missing:
                raise DatasetWriteError(
                    f"cannot resume in {where}: shard files {missing} are gone; rerun with --overwrite to start over"
                )
            old = [path for path in old if path.name not in keep]
        elif keep is not None:
            overwrite = True  # resuming with nothing kept: leftovers of the interrupted run go
        if (old or marker) and not overwrite:
            raise DatasetWriteError(
                f"{where} already holds a dataset ({len(old)} shard files); "
                "pass overwrite=True (CLI: --overwrite) or choose an empty folder"
            )
        # Remove the manifest first: from here on the folder no longer claims to be complete.
        for path in marker + old:
            try:
                path.unlink()
            except OSError as err:
                raise DatasetWriteError(f"cannot remove old {path}: {err.strerror or err}") from err
        probe = where / ".write_test"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise DatasetWriteError(
                f"cannot write into dataset folder {where}: {err.strerror or err}; "
                "check its permissions or choose another output path"
            ) from err

    def _reload_shard(self, info: ShardInfo) -> None:
        """Read a kept shard's small members back, so keys, checks and statistics cover it."""
        samples: dict[str, dict[str, bytes]] = {}
        path = self.out_dir / info.path
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    base = member.name.rpartition("/")[2]  # key = path up to the first dot of the basename
                    stem, _, suffix = base.partition(".")
                    key = member.name[: len(member.name) - len(base)] + stem
                    wanted = suffix in ("meta.json", "action.npy", "state.npy", "json", *IMAGE_EXTS) or (
                        suffix.split(".")[1:2] == ["0000"]
                    )
                    if wanted and member.isfile():
                        samples.setdefault(key, {"__key__": key})[suffix] = tar.extractfile(member).read()
        except (OSError, tarfile.TarError) as err:
            raise DatasetWriteError(f"cannot resume: {path} is unreadable ({err}); rerun with --overwrite") from err
        if len(samples) != info.samples:
            raise DatasetWriteError(
                f"cannot resume: {path} holds {len(samples)} samples, expected {info.samples}; rerun with --overwrite"
            )
        lengths = [self._account_robot(s) if self.kind == "robot" else self._account_vl(s) for s in samples.values()]
        self._keys.update(samples)
        self.shards.append(ShardInfo(info.path, info.samples, frames=sum(lengths), max_length=max(lengths, default=0)))

    # -- writing ------------------------------------------------------------------------

    def write_episode(self, ep: Episode) -> None:
        """Encode and write one robot episode (one webdataset sample)."""
        self.write_sample(encode_episode(ep, self.image_ext, self.jpeg_quality))

    def write_vl(self, sample: VLSample) -> None:
        """Encode and write one image + conversation sample."""
        self.write_sample(encode_vl(sample, self.image_ext, self.jpeg_quality))

    def write_sample(self, sample: dict[str, bytes | str]) -> None:
        """Write an already encoded sample (from `encode_episode` / `encode_vl`).

        This lets converters encode images in worker processes; counts and statistics
        are read back from the encoded arrays, so they always match what is on disk.
        """
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        key = sample.get("__key__")
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise FormatError(f"sample key {key!r} must be non-empty and use only letters, digits, '_', '-', '/'")
        if key in self._keys:
            raise FormatError(f"duplicate sample key {key!r} in dataset {self.out_dir}")
        sample = {k: v.encode() if isinstance(v, str) and k != "__key__" else v for k, v in sample.items()}
        frames = self._account_robot(sample) if self.kind == "robot" else self._account_vl(sample)
        self._keys.add(key)

        if self._tar is None:
            self._open_shard()
        assert self._tar is not None
        self._tar.write(sample)
        self._shard_samples += 1
        self._shard_frames += frames
        self._shard_longest = max(self._shard_longest, frames)
        self._shard_bytes += sum(_tar_member_size(len(v)) for k, v in sample.items() if not k.startswith("_"))
        full_count = self.max_samples is not None and self._shard_samples >= self.max_samples
        full_bytes = self.max_bytes is not None and self._shard_bytes >= self.max_bytes
        if full_count or full_bytes:
            self._finish_shard()

    @property
    def open_samples(self) -> int:
        """Samples written into the shard not yet finished (0 right after a shard was cut)."""
        return self._shard_samples if self._tar is not None else 0

    def _account_robot(self, sample: dict) -> int:
        """Check a robot sample against the dataset so far; keep its arrays for stats."""
        key = sample["__key__"]
        if "meta.json" not in sample or "action.npy" not in sample or "state.npy" not in sample:
            raise FormatError(f"sample {key}: a robot sample needs meta.json, action.npy and state.npy")
        try:
            meta = json.loads(sample["meta.json"])
        except ValueError as err:
            raise FormatError(f"sample {key}: meta.json is not JSON ({err})") from err
        action = decode_npy(sample["action.npy"])
        state = decode_npy(sample["state.npy"])
        if action.ndim != 2 or state.ndim != 2 or action.shape[0] != state.shape[0]:
            raise FormatError(f"sample {key}: action {action.shape} and state {state.shape} must be [L, D]")
        if not (np.isfinite(action).all() and np.isfinite(state).all()):
            raise FormatError(f"sample {key}: NaN or infinite values in action or state")
        cameras = list(meta.get("cameras", []))
        if self._cameras is None:
            self._cameras, self._action_dim, self._state_dim = cameras, action.shape[1], state.shape[1]
        elif (cameras, action.shape[1], state.shape[1]) != (self._cameras, self._action_dim, self._state_dim):
            raise FormatError(
                f"sample {key}: cameras {cameras}, action dim {action.shape[1]}, state dim {state.shape[1]} differ "
                f"from the dataset's {self._cameras}, {self._action_dim}, {self._state_dim}"
            )
        if self._spaces is not None:
            self._spaces.check(key, action, state)
        for cam, encoding in (meta.get("image_encoding") or {}).items():
            self._encodings.setdefault(cam, set()).add(encoding)
        if cameras and action.shape[0] > 0:
            first = frame_name(meta, cameras[0], 0)
            if first not in sample:
                raise FormatError(f"sample {key}: missing frame {first}")
            self._sizes.add(_image_size(sample[first]))
        self._actions.append(action.astype(np.float32))
        self._states.append(state.astype(np.float32))
        return int(action.shape[0])

    def _account_vl(self, sample: dict) -> int:
        key = sample["__key__"]
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None or "json" not in sample:
            raise FormatError(f"sample {key}: a VL sample needs an image (jpg/png/webp) and a json conversation")
        self._sizes.add(_image_size(sample[ext]))
        try:
            encoding = json.loads(sample["json"]).get("image_encoding")
        except (ValueError, AttributeError) as err:
            raise FormatError(f"sample {key}: json is not a JSON object ({err})") from err
        self._encodings.setdefault("image", set()).add(encoding or ext)
        return 0

    def _open_shard(self) -> None:
        final = self.out_dir / SHARD_PATTERN.format(len(self.shards))
        self._tmp_path = final.with_name(final.name + ".tmp")
        self._file = open(self._tmp_path, "wb")  # noqa: SIM115 - closed in _finish_shard / abort
        self._tar = wds.TarWriter(
            self._file, encoder=False, compress=False, mtime=TAR_MTIME, user="vla_scale", group="vla_scale"
        )
        self._shard_samples = self._shard_frames = self._shard_bytes = self._shard_longest = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._file is not None and self._tmp_path is not None
        self._tar.close()
        self._file.close()
        final = self._tmp_path.with_name(self._tmp_path.name[: -len(".tmp")])
        os.replace(self._tmp_path, final)
        self.shards.append(
            ShardInfo(final.name, self._shard_samples, frames=self._shard_frames, max_length=self._shard_longest)
        )
        self._tar = self._file = self._tmp_path = None

    # -- closing ------------------------------------------------------------------------

    def close(self) -> Manifest:
        """Finish the last shard, write stats.json (robot) and then manifest.json."""
        if self._closed:
            if self.manifest is None:
                raise RuntimeError(f"ShardWriter for {self.out_dir} was aborted; no manifest was written")
            return self.manifest
        if self._tar is not None:
            self._finish_shard()
        if not self.shards:
            self.abort()
            raise FormatError(f"no samples were written to {self.out_dir}; nothing to save")
        spaces = {}
        if self._spaces is not None:
            try:
                spaces = self._spaces.resolve(self._action_dim, self._state_dim).to_json()
            except FormatError:
                self.abort()
                raise
        if self.kind == "robot":
            stats = {"action": compute_stats(self._actions), "state": compute_stats(self._states)}
            tmp = self.out_dir / "stats.json.tmp"
            tmp.write_text(json.dumps(stats, indent=2))
            tmp.replace(self.out_dir / "stats.json")
        size = list(next(iter(self._sizes))) if len(self._sizes) == 1 else []
        self.manifest = Manifest(
            name=self.name,
            kind=self.kind,
            shards=list(self.shards),
            cameras=list(self._cameras or []),
            action_dim=self._action_dim,
            state_dim=self._state_dim,
            image_size=size,
            extra=self.extra,
            image_encoding={cam: " + ".join(sorted(seen)) for cam, seen in sorted(self._encodings.items())},
            spaces=spaces,
        )
        self.manifest.save(self.out_dir)
        self._closed = True
        return self.manifest

    def abort(self) -> None:
        """Drop the shard in progress and write no manifest: the folder stays marked incomplete."""
        if self._tar is not None:
            try:
                self._tar.close()
            finally:
                assert self._file is not None and self._tmp_path is not None
                self._file.close()
                self._tmp_path.unlink(missing_ok=True)
        self._tar = self._file = self._tmp_path = None
        self._closed = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
