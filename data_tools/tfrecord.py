"""Read TFRecord files and `tf.train.Example` protos without TensorFlow.

Why: TensorFlow is a ~1.8 GB install only to read RLDS/TFDS datasets, whose records are
plain framed protobufs. Framing (little-endian): `uint64 length | uint32 masked_crc32c(length)
| data | uint32 masked_crc32c(data)`. `Example` = `Features features = 1`, `Features` =
`map<string, Feature> feature = 1`, `Feature` = oneof bytes_list (1) / float_list (2) /
int64_list (3), each a `repeated value = 1` (packed or not).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from vla_scale.data.format import FormatError

try:  # optional C implementation; the pure-Python table below gives the same values
    from crc32c import crc32c as _fast_crc32c
except ImportError:  # pragma: no cover - depends on the environment
    _fast_crc32c = None

_POLY = 0x82F63B78  # Castagnoli, reflected
_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ _POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)
_NP_TABLE = np.array(_TABLE, dtype=np.uint32)
_MASK_DELTA = 0xA282EAD8
_SMALL = 4096  # below this a plain table loop beats the vectorised version

Value = list[bytes] | np.ndarray


class TFRecordError(FormatError):
    """A TFRecord file or Example proto that is truncated or corrupt."""


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord uses it."""
    if _fast_crc32c is not None:
        return _fast_crc32c(data)
    if len(data) >= _SMALL:
        return _crc32c_numpy(data)
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _apply(matrix: np.ndarray, x: np.ndarray) -> np.ndarray:
    """A GF(2) 32x32 matrix (given as the images of the 32 unit vectors) applied to every value of `x`."""
    out = np.zeros_like(x)
    for bit in range(32):
        out ^= ((x >> np.uint32(bit)) & np.uint32(1)) * matrix[bit]
    return out


def _zeros_operator(n: int) -> np.ndarray:
    """The linear map: CRC register -> register after feeding `n` zero bytes."""
    step = np.array([1 << b for b in range(32)], dtype=np.uint32)
    for _ in range(8):
        step = np.where(step & 1, (step >> np.uint32(1)) ^ np.uint32(_POLY), step >> np.uint32(1)).astype(np.uint32)
    result = np.array([1 << b for b in range(32)], dtype=np.uint32)
    while n:  # square-and-multiply
        if n & 1:
            result = _apply(step, result)
        step = _apply(step, step)
        n >>= 1
    return result


def _crc32c_numpy(data: bytes) -> int:
    """Table CRC over many equal chunks at once, merged pairwise: CRC is linear over GF(2).

    Leading zero bytes leave a zero-initialised register at zero, so the data is padded in
    front to equal chunks; the 0xFFFFFFFF initial value is added back as a shifted term.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    lanes = 1 << max(0, min(14, (len(buf) // 1024).bit_length() - 1))
    n = -(-len(buf) // lanes)
    padded = np.zeros(n * lanes, dtype=np.uint8)
    padded[len(padded) - len(buf) :] = buf
    chunks = padded.reshape(lanes, n)
    crc = np.zeros(lanes, dtype=np.uint32)
    for i in range(n):
        crc = _NP_TABLE[(crc ^ chunks[:, i]) & 0xFF] ^ (crc >> np.uint32(8))
    while len(crc) > 1:
        crc = _apply(_zeros_operator(n), crc[0::2]) ^ crc[1::2]
        n *= 2
    init = _apply(_zeros_operator(len(buf)), np.array([0xFFFFFFFF], dtype=np.uint32))
    return int(crc[0] ^ init[0] ^ np.uint32(0xFFFFFFFF))


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _read_header(f, path: Path, offset: int) -> int | None:
    """Length of the record at `offset` (after checking its header CRC), or None at end of file."""
    header = f.read(12)
    if not header:
        return None
    if len(header) < 12:
        raise TFRecordError(f"{path}: truncated record header at byte offset {offset}; the file is incomplete")
    length_bytes, (length_crc,) = header[:8], struct.unpack("<I", header[8:])
    if masked_crc32c(length_bytes) != length_crc:
        raise TFRecordError(
            f"{path}: corrupt record length at byte offset {offset} (CRC mismatch); re-download this file"
        )
    return struct.unpack("<Q", length_bytes)[0]


def record_offsets(path: str | Path) -> list[int]:
    """Byte offsets of every record, checking the framing but not reading the payloads."""
    path = Path(path)
    size = path.stat().st_size
    offsets: list[int] = []
    with open(path, "rb") as f:
        offset = 0
        while (length := _read_header(f, path, offset)) is not None:
            end = offset + 12 + length + 4
            if end > size:
                raise TFRecordError(f"{path}: record at byte offset {offset} runs past the end; the file is incomplete")
            offsets.append(offset)
            f.seek(end)
            offset = end
    return offsets


def read_record(path: str | Path, offset: int, verify: bool = True) -> bytes:
    """The payload of the record at `offset`, checking its CRC unless `verify` is False."""
    path = Path(path)
    with open(path, "rb") as f:
        f.seek(offset)
        length = _read_header(f, path, offset)
        if length is None:
            raise TFRecordError(f"{path}: no record at byte offset {offset}")
        data = f.read(length)
        footer = f.read(4)
    if len(data) < length or len(footer) < 4:
        raise TFRecordError(f"{path}: record at byte offset {offset} is truncated; the file is incomplete")
    if verify and masked_crc32c(data) != struct.unpack("<I", footer)[0]:
        raise TFRecordError(f"{path}: corrupt record data at byte offset {offset} (CRC mismatch); re-download it")
    return data


def iter_records(path: str | Path, verify: bool = True) -> Iterator[bytes]:
    for offset in record_offsets(path):
        yield read_record(path, offset, verify)


# -- protobuf wire format ---------------------------------------------------------------


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise TFRecordError("truncated varint in Example proto")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise TFRecordError("varint longer than 10 bytes in Example proto")


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value): an int for varint/fixed types, a slice for length-delimited."""
    pos = 0
    while pos < len(buf):
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            length, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = buf[pos : pos + 4], pos + 4  # kept raw: FloatList reinterprets it
        else:
            raise TFRecordError(f"unsupported protobuf wire type {wire} in Example proto")
        if pos > len(buf):
            raise TFRecordError("truncated field in Example proto")
        yield number, wire, value


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _parse_feature(buf: memoryview) -> Value:
    for number, _, kind in _fields(buf):
        if not isinstance(kind, memoryview):
            continue
        if number == 1:  # BytesList
            return [bytes(v) for n, w, v in _fields(kind) if n == 1 and w == 2]
        if number == 2:  # FloatList: packed (wire 2) and/or single fixed32 (wire 5)
            parts = [np.frombuffer(v, dtype="<f4") for n, w, v in _fields(kind) if n == 1 and w in (2, 5)]
            return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)
        if number == 3:  # Int64List: packed varints (wire 2) and/or single varints (wire 0)
            values: list[int] = []
            for n, w, v in _fields(kind):
                if n == 1 and w == 0:
                    values.append(_signed64(v))
                elif n == 1 and w == 2:
                    pos = 0
                    while pos < len(v):
                        x, pos = _varint(v, pos)
                        values.append(_signed64(x))
            return np.array(values, dtype=np.int64)
    return []  # a Feature with no kind set


def parse_example(data: bytes) -> dict[str, Value]:
    """`tf.train.Example` bytes → {key: list of bytes | float32 array | int64 array}."""
    out: dict[str, Value] = {}
    for number, wire, features in _fields(memoryview(data)):
        if number != 1 or wire != 2:
            continue
        for n, w, entry in _fields(features):
            if n != 1 or w != 2:
                continue
            key, value = "", None
            for en, ew, ev in _fields(entry):
                if en == 1 and ew == 2:
                    key = bytes(ev).decode("utf-8")
                elif en == 2 and ew == 2:
                    value = ev
            out[key] = _parse_feature(value) if value is not None else []
    return out
