"""Reading one reader's share of shards as raw samples, with every damaged or repeated sample reported.

A plain webdataset read drops what it cannot see: a shard cut short at a member boundary just
ends (its missing episodes uncounted), a sample cut mid-member arrives with members missing, and a
key written twice is read twice. Here each of those is reported through `on_bad(where, err, n)` so
the bad-sample policy counts (or refuses) it: the sample cut short by name, the samples the
manifest lists beyond the cut as a number, a repeated key by name (its first copy is kept).
Every sample, bad ones included, holds one position in the sample-level split, so with fewer
shards than readers each loss is counted by exactly one reader.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import BinaryIO

from vla_scale.data.errors import FormatError

REWRITE = "re-convert the dataset or restore the shard"
_KEY = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # webdataset's key/suffix split: key up to the first dot

OnBad = Callable[[str, Exception, int], None]  # (where, error, how many samples it stands for)
Opener = Callable[[str], BinaryIO]  # shard path/URL -> seekable binary file (remote: the cached copy)


_ZERO = bytes(512)


def _octal(field: bytes, where: str) -> int:
    """A tar number field: NUL/space-terminated octal, or base-256 when its first byte has the high bit."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise FormatError(f"tar read error (bad number {text!r} in the header {where})") from None


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax(data: bytes) -> dict[str, str]:
    """A pax extended header's `LEN key=value\\n` records."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _members(path: str, opener: Opener | None = None) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of each regular member; raises FormatError where the tar is cut short or corrupt.

    A plain ustar/pax/GNU-longname reader rather than `tarfile`: parsing each header in Python costs
    `tarfile` ~30 us, as much as decoding a small frame, and every frame is a member (two with pax).
    """
    try:
        f = opener(path) if opener else open(path, "rb")  # noqa: SIM115 (closed below; a missing file is reported)
    except OSError as err:
        raise FormatError(f"cannot open the shard ({err})") from err
    with f:
        offset = 0
        extended: dict[str, str] = {}  # pax "path"/"size" or a GNU long name, for the next member
        while True:
            header = f.read(512)
            where = f"at byte {offset}"
            if header == _ZERO:
                if f.read(512) != _ZERO:  # a tar ends with two zero blocks
                    raise FormatError(f"tar ends at byte {offset} without its end-of-archive blocks (truncated)")
                return
            if len(header) < 512:
                if not header:
                    raise FormatError(f"tar ends at byte {offset} without its end-of-archive blocks (truncated)")
                raise FormatError(f"tar read error (header {where} cut short: {len(header)} of 512 bytes)")
            stored = _octal(header[148:156], where)
            if stored != sum(header) - sum(header[148:156]) + 256:  # the checksum counts its own field as spaces
                raise FormatError(f"tar read error (bad header checksum {where})")
            size = int(extended.get("size", _octal(header[124:136], where)))
            name = extended.get("path") or _text(header[:100])
            if not extended.get("path") and header[257:262] == b"ustar" and header[345] != 0:
                name = _text(header[345:500]) + "/" + name
            kind = header[156:157]
            data = f.read(size)
            if len(data) != size:
                raise FormatError(f"member {name} is cut short ({len(data)} of {size} bytes)")
            pad = -size % 512
            if pad and len(f.read(pad)) != pad:
                raise FormatError(f"tar read error (member {name} is missing its padding)")
            offset += 512 + size + pad
            if kind == b"x":
                try:
                    extended = _pax(data)
                except ValueError as err:
                    raise FormatError(f"tar read error (bad pax header {where}: {err})") from err
                continue
            if kind == b"L":
                extended = {"path": _text(data)}
                continue
            extended = {}
            if kind in (b"0", b"\0", b"7"):
                yield name, data


class Truncated(FormatError):
    """The shard could not be read to its end; `key` is the sample being read when it stopped (None: between)."""

    def __init__(self, reason: str, key: str | None):
        super().__init__(reason)
        self.key = key


def _groups(path: str, opener: Opener | None = None) -> Iterator[dict]:
    """Consecutive members sharing a key → one raw sample; a member name repeated inside starts a new one.

    A sample is yielded only once the next one begins (or the tar ends cleanly), so every yielded
    sample is complete; the one in progress where the tar breaks off is named in `Truncated`.
    """
    current: dict | None = None
    try:
        for name, data in _members(path, opener):
            match = _KEY.match(name)
            if match is None:
                continue
            key, suffix = match.group(1), match.group(2).lower()
            if current is None or current["__key__"] != key or suffix in current:
                if current is not None:
                    yield current
                current = {"__key__": key, "__url__": path}
            current[suffix] = data
    except FormatError as err:
        raise Truncated(str(err), None if current is None else current["__key__"]) from err
    if current is not None:
        yield current


class SampleReader:
    """Raw samples of `paths` for one reader (every `count`-th one when `stride` is set), damage reported."""

    def __init__(self, stride: int | None, count: int, on_bad: OnBad, opener: Opener | None = None):
        self.stride, self.count, self.on_bad, self.opener = stride, count, on_bad, opener
        self.position = 0

    def _take(self, n: int = 1) -> int:
        """Advance over `n` sample positions; returns how many of them are this reader's."""
        first, self.position = self.position, self.position + n
        if self.stride is None:
            return n
        return sum(1 for p in range(first, first + n) if p % self.count == self.stride)

    def shard(self, path: str, expected: int) -> Iterator[dict]:
        """Samples of one shard; `expected` is its sample count in manifest.json (how many a cut loses)."""
        seen: set[str] = set()
        found = 0
        try:
            for sample in _groups(path, self.opener):
                found += 1
                yield from self._accept(path, sample, seen)
        except Truncated as err:
            lost = max(expected - found, 1)  # the sample cut short (if any) and every one listed after it
            where, reason = path, str(err)
            if err.key is not None:
                where, reason = f"{path}:{err.key}", f"shard truncated inside this sample ({err})"
            if lost > (err.key is not None):
                reason += f"; {lost - (err.key is not None)} more listed in manifest.json are lost with it"
            owned = self._take(lost)
            if owned:
                self.on_bad(where, FormatError(f"{reason}; {REWRITE}"), owned)
            return
        if found == 0:
            self._take()
            self.on_bad(path, FormatError(f"shard holds no samples; {REWRITE}"), 1)

    def _accept(self, path: str, sample: dict, seen: set[str]) -> Iterator[dict]:
        key = sample["__key__"]
        mine = self._take()
        if key in seen:
            if mine:
                err = FormatError(f"duplicate sample key {key!r} in this shard: the repeat is skipped; {REWRITE}")
                self.on_bad(f"{path}:{key}", err, 1)
            return
        seen.add(key)
        if mine:
            yield sample


def check_robot_dims(key: str, action_dim: int, state_dim: int, action_shape: tuple, state_shape: tuple) -> None:
    """An episode whose action/state width differs from the manifest's would train on misaligned dimensions."""
    for name, want, shape in (("action", action_dim, action_shape), ("state", state_dim, state_shape)):
        if want and shape[-1] != want:
            raise FormatError(f"sample {key}: {name} has {shape[-1]} dimensions, manifest.json says {want}")


def check_frame_size(key: str, camera: str, image_size: list[int], shape: tuple) -> None:
    """Frames of another size than the manifest's image_size would be batched at a size no one declared."""
    if image_size and list(shape[-3:-1]) != list(image_size):
        raise FormatError(
            f"sample {key}: {camera} frames are {list(shape[-3:-1])} (H, W), manifest.json image_size is {image_size}"
        )
