"""The TensorFlow-free TFRecord / Example reader against an independent tiny encoder."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from data_tools import tfrecord
from data_tools.tfrecord import TFRecordError, crc32c, iter_records, masked_crc32c, parse_example, record_offsets


def crc32c_bitwise(data: bytes) -> int:
    """Reference CRC-32C, bit by bit (no table), to check the reader's table version."""
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


def example(features: dict[str, bytes]) -> bytes:
    return ld(1, b"".join(ld(1, ld(1, k.encode()) + ld(2, v)) for k, v in features.items()))


def write_tfrecord(path: Path, records: list[bytes]) -> None:
    path.write_bytes(b"".join(frame_record(r) for r in records))


def test_crc32c_known_values() -> None:
    assert crc32c_bitwise(b"123456789") == 0xE3069283  # the standard CRC-32C check value
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0
    data = bytes(range(256)) * 3
    assert crc32c(data) == crc32c_bitwise(data)
    assert masked_crc32c(data) == masked(data)


def test_pure_python_and_vectorised_crc_match(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tfrecord, "_fast_crc32c", None)  # the optional C package, if installed, is not what we test
    assert crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    for size in (4095, 4096, 5003, 70001):  # around the switch to the vectorised path, and uneven chunks
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc32c(data) == crc32c_bitwise(data), size


def test_example_packed_and_unpacked_fields() -> None:
    proto = example(
        {
            "img": bytes_feature([b"\x00abc\x00", b""]),  # NUL bytes and empty entries survive
            "f_packed": float_feature([1.5, -2.25, 3.0]),
            "f_single": float_feature([0.5, 0.25], packed=False),
            "i_packed": int_feature([0, 1, -1, 2**40, -(2**63)]),
            "i_single": int_feature([7, -3], packed=False),
            "empty": b"",
        }
    )
    got = parse_example(proto)
    assert got["img"] == [b"\x00abc\x00", b""]
    np.testing.assert_array_equal(got["f_packed"], np.array([1.5, -2.25, 3.0], np.float32))
    np.testing.assert_array_equal(got["f_single"], np.array([0.5, 0.25], np.float32))
    np.testing.assert_array_equal(got["i_packed"], np.array([0, 1, -1, 2**40, -(2**63)], np.int64))
    np.testing.assert_array_equal(got["i_single"], np.array([7, -3], np.int64))
    assert got["empty"] == []


def test_records_roundtrip(tmp_path: Path) -> None:
    records = [b"", b"x" * 1000, example({"a": int_feature([1])})]
    write_tfrecord(tmp_path / "a.tfrecord", records)
    assert list(iter_records(tmp_path / "a.tfrecord")) == records
    assert record_offsets(tmp_path / "a.tfrecord") == [0, 16, 16 + 1016]


def test_corrupt_data_names_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "bad.tfrecord"
    write_tfrecord(path, [b"first record", b"second record"])
    raw = bytearray(path.read_bytes())
    second = 12 + len(b"first record") + 4
    raw[second + 12 + 3] ^= 0xFF  # flip a payload byte of record 2
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match=rf"bad.tfrecord: corrupt record data at byte offset {second}"):
        list(iter_records(path))
    raw[3] ^= 0x01  # now the length of record 1
    path.write_bytes(bytes(raw))
    with pytest.raises(TFRecordError, match="corrupt record length at byte offset 0"):
        record_offsets(path)


def test_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.tfrecord"
    write_tfrecord(path, [b"abc" * 10])
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(TFRecordError, match="runs past the end"):
        record_offsets(path)
