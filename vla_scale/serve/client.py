"""`PolicyClient`: the robot / evaluator side of `vla-scale serve`, a blocking websocket client.

One client is one connection and so one episode on the server: `reset()` between episodes, `infer(obs)` per
query. Requests on one client are sent one at a time (a lock makes it safe to call from the control thread and
from `AsyncChunkExecutor`'s background thread). A refused request raises `ServerError` with the field the
server named; the connection stays usable. So it does after a request timed out (`TimeoutError`): the reply that
arrives late carries that request's id, and the next request drops it instead of taking it for its own.
The socket is read by the thread that waits for the reply (vla_scale/serve/transport.py says why).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np

from vla_scale.serve import protocol as proto
from vla_scale.serve.transport import Connection


class PolicyClient:
    """Connect to a policy server at `url` (ws://host:port); `metadata` holds what the server sent on connect."""

    def __init__(self, url: str, timeout: float | None = 60.0, max_message_bytes: int | None = None) -> None:
        self.url = url
        self.timeout = timeout
        self._lock = threading.Lock()
        self._next_id = 0
        self._ws = Connection(url, open_timeout=timeout, max_size=max_message_bytes)
        self.metadata: dict = proto.unpack(self._ws.recv(timeout))
        if self.metadata.get("type") != "metadata":
            raise RuntimeError(f"{url} did not open with the policy server's metadata: {self.metadata}")

    @property
    def cameras(self) -> list[str]:
        return list(self.metadata["cameras"])

    @property
    def chunk_size(self) -> int:
        return int(self.metadata["chunk_size"])

    def request(self, message: dict) -> dict:
        """Send one request and wait for its reply; raises `ServerError` for an error reply."""
        with self._lock:
            self._next_id += 1
            message = {**message, "id": self._next_id}
            with proto.packed(message) as frame:
                self._ws.send(frame)
            reply = self._reply_to(message["id"])
        if reply.get("type") == "error":
            raise proto.ServerError(str(reply.get("field")), str(reply.get("message")))
        if reply.get("id") != message["id"]:
            raise RuntimeError(f"reply {reply.get('id')} does not answer request {message['id']}")
        return reply

    def _reply_to(self, request_id: int) -> dict:
        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            reply = proto.unpack(self._ws.recv(left))
            late = reply.get("id")
            if not (isinstance(late, int) and late < request_id):
                return reply  # else: the answer to an earlier request that timed out; dropped

    def send_raw(self, frame: bytes | str) -> dict:
        """Send an arbitrary frame and return the decoded reply as is (protocol tests, debugging)."""
        with self._lock:
            self._ws.send(frame)
            return proto.unpack(self._ws.recv(self.timeout))

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode on the server (history and head memory cleared; `seed` seeds sampled chunks)."""
        self.request({"type": "reset", "seed": seed})

    def infer(
        self, obs: dict[str, Any], seed: int | None = None, prefix: np.ndarray | None = None, prefix_delay: int = 0
    ) -> np.ndarray:
        """`{"images": {camera: uint8 [H, W, 3]}, "state": [S], "instruction": str}` → action chunk [N, A] (float32).
        `prefix` / `prefix_delay`: real-time chunking for a flow policy (metadata `inpainting`; `Policy.predict`)."""
        message: dict[str, Any] = {"type": "infer", "obs": obs, "seed": seed}
        if prefix is not None:
            message.update(prefix=np.asarray(prefix, np.float32), prefix_delay=int(prefix_delay))
        return self.request(message)["actions"]

    def health(self) -> dict:
        return self.request({"type": "health"})

    def close(self) -> None:
        """Close the connection; a request another thread is waiting on raises `ConnectionClosed`."""
        if self._lock.acquire(blocking=False):
            try:
                self._ws.close()
            finally:
                self._lock.release()
        else:
            self._ws.abort()

    def __enter__(self) -> PolicyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def observation(images: dict[str, np.ndarray], instruction: str, state: np.ndarray | None = None) -> dict[str, Any]:
    """An `infer` observation from camera frames, the instruction and the raw state."""
    obs: dict[str, Any] = {"images": {k: np.asarray(v) for k, v in images.items()}, "instruction": instruction}
    if state is not None:
        obs["state"] = np.asarray(state, np.float32)
    return obs
