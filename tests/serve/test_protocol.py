"""The wire format on its own: arrays through pack/packed/unpack, errors naming their path, the kept buffer."""

from __future__ import annotations

import numpy as np
import pytest

from vla_scale.serve import protocol as proto


def message() -> dict:
    rng = np.random.default_rng(0)
    return {
        "type": "infer",
        "obs": {
            "images": {"cam": rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)},
            "state": rng.standard_normal(4).astype(np.float32),
            "instruction": "stack the cups",
        },
        "extra": [np.arange(6, dtype=np.int64).reshape(2, 3), {"flag": np.array([True, False])}, 1.5, None],
        "scalar": np.float32(0.25),
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(b, dict):
        assert isinstance(a, dict) and a.keys() == b.keys()
        for k in b:
            assert_same(a[k], b[k])
    elif isinstance(b, list):
        assert isinstance(a, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == (b.item() if isinstance(b, np.generic) else b)


def test_arrays_anywhere_in_the_message_round_trip():
    msg = message()
    assert_same(proto.unpack(proto.pack(msg)), msg)
    with proto.packed(msg) as frame:
        assert bytes(frame) == proto.pack(msg)
        assert_same(proto.unpack(bytes(frame)), msg)


def test_kept_buffer_is_reused_and_survives_a_view_that_outlives_the_block():
    msg, small = message(), {"type": "health", "id": 3}
    with proto.packed(small):
        kept = proto._local.packer
    with proto.packed(msg):
        assert proto._local.packer is kept  # one packer per thread, reused
    with proto.packed(msg) as frame:
        held = frame[:10]  # a view of the packer's buffer kept past the block: the buffer cannot be reset
    with proto.packed(small) as frame:
        assert bytes(frame) == proto.pack(small)
    assert bytes(held) == proto.pack(msg)[:10]
    with pytest.raises(TypeError, match="cannot send a set"):
        with proto.packed({"bad": {1, 2}}):
            pass
    with proto.packed(small) as frame:  # nothing of the failed message is left in the buffer
        assert bytes(frame) == proto.pack(small)


@pytest.mark.parametrize(
    ("array", "path", "text"),
    [
        ({"__ndarray__": True, "dtype": "<f4", "shape": [4], "data": b"\0" * 12}, "obs.images.cam", "needs 16 bytes"),
        ({"__ndarray__": True, "dtype": "|O", "shape": [1], "data": b"\0" * 8}, "obs.images.cam", "not allowed"),
        ({"__ndarray__": True, "dtype": "nope", "shape": [1], "data": b"\0"}, "obs.images.cam", "unknown dtype"),
        ({"__ndarray__": True, "dtype": "<u1", "shape": [-1], "data": b""}, "obs.images.cam", "shape must be"),
    ],
)
def test_a_malformed_array_is_refused_under_its_path(array, path, text):
    frame = proto.pack({"type": "infer", "obs": {"images": {"cam": array}}, "ok": np.zeros(3)})
    with pytest.raises(proto.RequestError, match=text) as err:
        proto.unpack(frame)
    assert err.value.field == path


def test_a_malformed_array_in_an_otherwise_undecodable_frame_is_an_undecodable_message():
    bad = {"__ndarray__": True, "dtype": "<f4", "shape": [4], "data": b"\0" * 12}
    frame = proto.pack({"type": "infer", "x": bad})
    for broken in (frame + b"\xc1", frame[:-1]):  # trailing garbage; cut short
        with pytest.raises(proto.RequestError, match="undecodable") as err:
            proto.unpack(broken)
        assert err.value.field == "message"


def test_an_array_in_a_list_is_refused_under_its_index():
    bad = {"__ndarray__": True, "dtype": "<f4", "shape": [2], "data": b"\0"}
    with pytest.raises(proto.RequestError) as err:
        proto.unpack(proto.pack({"frames": [np.zeros(2, np.float32), bad]}))
    assert err.value.field == "frames[1]"


def test_a_message_must_be_a_map():
    with pytest.raises(proto.RequestError, match="got a ndarray"):
        proto.unpack(proto.pack(np.zeros(3)))  # type: ignore[arg-type]
    with pytest.raises(proto.RequestError, match="text frame"):
        proto.unpack("{}")
    with pytest.raises(proto.RequestError, match="undecodable"):
        proto.unpack(b"\xc1")
