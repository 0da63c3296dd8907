"""The TensorFlow-free TFRecord / Example reader against an independent tiny encoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools import tfrecord
from data_tools.tfrecord import TFRecordError, crc32c, iter_records, masked_crc32c, parse_example, record_offsets
from tests.data_tools.tfrecord_encoder import (
    bytes_feature,
    crc32c_bitwise,
    example,
    float_feature,
    int_feature,
    masked,
    write_tfrecord,
)


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
