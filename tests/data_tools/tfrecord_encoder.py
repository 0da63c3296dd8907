"""A tiny TFRecord + tf.train.Example encoder for tests, written independently of `data_tools.tfrecord`.

It checksums bit by bit (no table) so it also serves as the reference for the reader's CRC.
"""

from __future__ import annotations

import struct
from pathlib import Path


def crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    crc = crc32c_bitwise(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def frame_record(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked(length)) + data + struct.pack("<I", masked(data))


def write_tfrecord(path: Path, records: list[bytes]) -> None:
    path.write_bytes(b"".join(frame_record(r) for r in records))


def varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # negative int64 → 10-byte two's complement, as protobuf does
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def ld(field: int, payload: bytes) -> bytes:
    return varint(field << 3 | 2) + varint(len(payload)) + payload


def bytes_feature(values: list[bytes]) -> bytes:
    return ld(1, b"".join(ld(1, v) for v in values))


def float_feature(values: list[float], packed: bool = True) -> bytes:
    if packed:
        inner = ld(1, struct.pack(f"<{len(values)}f", *values))
    else:
        inner = b"".join(varint(1 << 3 | 5) + struct.pack("<f", v) for v in values)
    return ld(2, inner)


def int_feature(values: list[int], packed: bool = True) -> bytes:
    if packed:
        inner = ld(1, b"".join(varint(v) for v in values))
    else:
        inner = b"".join(varint(1 << 3) + varint(v) for v in values)
    return ld(3, inner)


def feature(values: list) -> bytes:
    """A packed feature whose list type follows the Python type of the values."""
    if isinstance(values[0], bytes):
        return bytes_feature(values)
    if isinstance(values[0], float):
        return float_feature(values)
    return int_feature(values)


def example(features: dict[str, bytes]) -> bytes:
    """tf.train.Example from already encoded features (`bytes_feature`, `float_feature`, ...)."""
    return ld(1, b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in features.items()))
