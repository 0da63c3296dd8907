"""Wire format of the policy server: msgpack maps over binary websocket frames, numpy arrays inline.

An ndarray travels as the map `{"__ndarray__": true, "dtype": "<u1", "shape": [H, W, 3], "data": <bytes>}` (the
dtype's numpy string, C order), the same idea as openpi's msgpack_numpy: no pickle, so a message can only
ever decode into plain data, and the decoder checks dtype kind, shape and byte count before it builds an
array. Only boolean, integer, unsigned and float dtypes are accepted.

Messages (client → server; every request may carry an `id`, echoed in its reply):

- `{"type": "infer", "obs": {"images": {camera: uint8 [H, W, 3]}, "state": float [S], "instruction": str},
  "seed": int | None, "prefix": float [P, A] | None, "prefix_delay": int}` → `{"type": "actions", "actions":
  float32 [N, A], "server_ms": float}`; `prefix` (flow policies, metadata `inpainting`): the previous chunk's
  actions from this step on, which the new chunk continues (real-time chunking, `Policy.predict`)
- `{"type": "reset", "seed": int | None}` → `{"type": "reset"}`: a new episode for this connection
- `{"type": "health"}` → `{"type": "health", "status": "ok" | "stopping", "connections": n, "sessions": n,
  "busy": bool, "served": n}` (`busy`: an inference is running)
- `{"type": "metadata"}` → the metadata map, which the server also sends unasked as the first frame

Any request that cannot be served is answered `{"type": "error", "field": "obs.state", "message": "..."}` naming
the offending field and what was expected; the connection stays open.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
NDARRAY_KEY = "__ndarray__"
ARRAY_KINDS = "biuf"  # bool, int, uint, float: never object, string or void dtypes
MAX_DIMS = 8
INSTRUCTION_ENCODINGS = ("utf-8",)  # for an instruction sent as bytes; a msgpack str is utf-8 already
REQUEST_TYPES = ("infer", "reset", "health", "metadata")


class RequestError(ValueError):
    """A request the server refuses: `field` is where in the message (dotted path), the text says what was expected."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class ServerError(RuntimeError):
    """An error reply from the server, raised by the client; `field` names the offending part of the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"server refused {field}: {message}")
        self.field = field
        self.message = message


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in ARRAY_KINDS:
            raise TypeError(f"cannot send an array of dtype {obj.dtype}; only bool, int and float arrays travel")
        arr = np.ascontiguousarray(obj)
        # a view, not `tobytes()`: msgpack copies the bytes into the message once instead of twice
        data = memoryview(arr.reshape(-1).view(np.uint8))
        return {NDARRAY_KEY: True, "dtype": arr.dtype.str, "shape": list(arr.shape), "data": data}
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__}")


def pack(message: dict) -> bytes:
    """One message → the bytes of a binary websocket frame."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


_local = threading.local()


@contextmanager
def packed(message: dict) -> Iterator[memoryview]:
    """`pack` into this thread's kept buffer, for sending inside the block. Why: a 0.3 MB request packed by
    `packb` is written into a fresh 256 KiB buffer, copied again as it outgrows it and once more into the
    returned bytes; a kept buffer is already large enough, and a server's reply goes out from it directly (a
    client's frame is masked from it into one copy)."""
    packer = getattr(_local, "packer", None)
    if packer is None:
        packer = _local.packer = msgpack.Packer(default=_default, use_bin_type=True, autoreset=False)
    try:
        packer.pack(message)
    except BaseException:
        _local.packer = None  # it may hold part of the message
        raise
    view = packer.getbuffer()
    try:
        yield view
    finally:
        view.release()
        try:
            packer.reset()
        except BufferError:  # a view of the buffer outlived the block (held by a traceback): start a new one
            _local.packer = None


def unpack(frame: bytes | str) -> dict:
    """A frame → the message map with its arrays rebuilt; `RequestError` names what was malformed."""
    if isinstance(frame, str):
        raise RequestError("message", "expected a binary frame holding a msgpack map, got a text frame")
    try:
        obj = _decode(frame, _array_hook)
    except RequestError:  # a malformed array (or undecodable bytes): decoded again the slow way, naming where
        obj = _arrays(_decode(frame), "")
    if not isinstance(obj, dict):
        raise RequestError("message", f"expected a msgpack map, got a {type(obj).__name__}")
    return obj


def _decode(frame: bytes, hook: Any = None) -> Any:
    """msgpack's decoding of `frame`; whatever it raises on bad bytes becomes an "undecodable" `RequestError`."""
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False, object_hook=hook)
    except RequestError:
        raise  # from the hook
    except Exception as err:  # noqa: BLE001 - msgpack raises several unrelated types on bad input
        raise RequestError("message", f"expected a msgpack map, got undecodable bytes ({err})") from None


def _array_hook(obj: dict) -> Any:
    """msgpack's hook for every decoded map: arrays are rebuilt inside its C loop, no walk over the message."""
    return _decode_array(obj, "message") if obj.get(NDARRAY_KEY) is True else obj


def _arrays(obj: Any, path: str) -> Any:
    """Arrays rebuilt by walking the message, each checked under its dotted path (for the error reply)."""
    if isinstance(obj, dict):
        if obj.get(NDARRAY_KEY) is True:
            return _decode_array(obj, path or "message")
        return {k: _arrays(v, f"{path}.{k}" if path else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_arrays(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    return obj


def _decode_array(obj: dict, path: str) -> np.ndarray:
    try:
        dtype = np.dtype(obj.get("dtype"))
    except TypeError:
        raise RequestError(path, f"array has an unknown dtype {obj.get('dtype')!r}") from None
    if dtype.kind not in ARRAY_KINDS:
        raise RequestError(path, f"array dtype {dtype} is not allowed (bool, int or float only)")
    shape, data = obj.get("shape"), obj.get("data")
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise RequestError(path, f"array shape must be a list of at most {MAX_DIMS} sizes >= 0, got {shape!r}")
    if not isinstance(data, bytes) or len(data) != math.prod(shape) * dtype.itemsize:
        size = len(data) if isinstance(data, bytes) else type(data).__name__
        raise RequestError(path, f"array {dtype} {shape} needs {math.prod(shape) * dtype.itemsize} bytes, got {size}")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def error_reply(field: str, message: str, request_id: Any = None) -> dict:
    """The reply to a request that cannot be served."""
    return {"type": "error", "id": request_id, "field": field, "message": message}


def parse_request(message: dict) -> str:
    """The request's type, checked against the known ones."""
    kind = message.get("type")
    if kind not in REQUEST_TYPES:
        raise RequestError("type", f"unknown message type {kind!r}; expected one of {', '.join(REQUEST_TYPES)}")
    return str(kind)


def parse_seed(message: dict) -> int | None:
    """The optional integer `seed` of an infer or reset request."""
    seed = message.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise RequestError("seed", f"expected an integer in [0, 2**63) or null, got {seed!r}")
    return seed


def parse_instruction(obs: dict) -> str:
    """The instruction: a msgpack str, or bytes in a declared `instruction_encoding`."""
    text = obs.get("instruction")
    encoding = obs.get("instruction_encoding", "utf-8")
    if encoding not in INSTRUCTION_ENCODINGS:
        raise RequestError(
            "obs.instruction_encoding",
            f"unknown instruction encoding {encoding!r}; expected one of {', '.join(INSTRUCTION_ENCODINGS)}",
        )
    if isinstance(text, bytes):
        try:
            return text.decode(encoding)
        except UnicodeDecodeError as err:
            raise RequestError("obs.instruction", f"bytes are not valid {encoding} ({err.reason})") from None
    if not isinstance(text, str):
        raise RequestError("obs.instruction", f"expected a string, got {type(text).__name__}")
    return text


def parse_images(obs: dict, cameras: list[str], max_side: int) -> dict[str, np.ndarray]:
    """`obs.images`: exactly the policy's cameras, each a uint8 [H, W, 3] frame."""
    images = obs.get("images")
    if not isinstance(images, dict):
        raise RequestError("obs.images", f"expected a map camera -> uint8 [H, W, 3] frame with cameras {cameras}")
    missing = [c for c in cameras if c not in images]
    if missing:
        raise RequestError("obs.images", f"missing camera(s) {missing}; the policy takes {cameras}, got {list(images)}")
    extra = [c for c in images if c not in cameras]
    if extra:
        raise RequestError("obs.images", f"unknown camera(s) {extra}; the policy takes {cameras}")
    for cam in cameras:
        frame = images[cam]
        if not isinstance(frame, np.ndarray):
            raise RequestError(f"obs.images.{cam}", f"expected a uint8 [H, W, 3] array, got {type(frame).__name__}")
        if frame.dtype != np.uint8:
            raise RequestError(f"obs.images.{cam}", f"expected dtype uint8 (RGB 0-255), got {frame.dtype}")
        if frame.ndim != 3 or frame.shape[-1] != 3 or not 0 < min(frame.shape[:2]) <= max(frame.shape[:2]) <= max_side:
            raise RequestError(
                f"obs.images.{cam}", f"expected shape [H, W, 3] with 1 <= H, W <= {max_side}, got {list(frame.shape)}"
            )
    return images


def parse_state(obs: dict, dim: int, required: bool) -> np.ndarray | None:
    """`obs.state`: a finite float vector of the policy's state dimension (optional if the policy ignores state)."""
    state = obs.get("state")
    if state is None:
        if required:
            raise RequestError("obs.state", f"the policy uses proprioceptive state: send a float [{dim}] array")
        return None
    if not isinstance(state, np.ndarray) or state.dtype.kind not in "iuf":
        raise RequestError("obs.state", f"expected a float [{dim}] array, got {getattr(state, 'dtype', type(state))}")
    if state.shape != (dim,):
        raise RequestError("obs.state", f"expected shape [{dim}], got {list(state.shape)}")
    if not np.isfinite(state).all():
        bad = [i for i, v in enumerate(state.tolist()) if not math.isfinite(v)]
        raise RequestError("obs.state", f"expected finite values, got NaN/inf at index(es) {bad}")
    return state.astype(np.float32)


def parse_prefix(message: dict, chunk_size: int, action_dim: int, inpainting: bool) -> tuple[np.ndarray | None, int]:
    """The optional real-time chunking `prefix` (finite float [P, A], 1 <= P <= N) and `prefix_delay` (0..P)."""
    prefix, delay = message.get("prefix"), message.get("prefix_delay", 0)
    if prefix is None:
        return None, 0
    if not inpainting:
        raise RequestError("prefix", "this policy cannot inpaint a chunk (real-time chunking needs a flow policy)")
    if not isinstance(prefix, np.ndarray) or prefix.dtype.kind not in "iuf":
        raise RequestError(
            "prefix", f"expected a float [P, {action_dim}] array, got {getattr(prefix, 'dtype', type(prefix))}"
        )
    if prefix.ndim != 2 or prefix.shape[1] != action_dim or not 1 <= prefix.shape[0] <= chunk_size:
        raise RequestError(
            "prefix", f"expected shape [P, {action_dim}] with 1 <= P <= {chunk_size}, got {list(prefix.shape)}"
        )
    if not np.isfinite(prefix).all():
        raise RequestError("prefix", "expected finite values, got NaN/inf")
    if isinstance(delay, bool) or not isinstance(delay, int) or not 0 <= delay <= prefix.shape[0]:
        raise RequestError(
            "prefix_delay", f"expected an integer in [0, {prefix.shape[0]}] (the prefix length), got {delay!r}"
        )
    return prefix.astype(np.float32), delay
