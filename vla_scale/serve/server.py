"""`PolicyServer`: one exported policy behind a websocket, one episode per connection.

The event loop (asyncio, `websockets`) moves bytes and checks requests; inference runs on a single worker
thread, so requests from all connections are served one at a time by the one model while the loop keeps
answering health checks, metadata and other clients' bad requests. Exception: once the last `INLINE_WINDOW`
inferences all took less than `inline_below_s` (a fast model), the next one runs on the event loop itself when
the worker is idle. Handing a request to the worker and its reply back costs two thread wake-ups, ~0.3 ms on a
lightly loaded 2-core machine and more under load: most of the server's overhead for a 5 ms model
(tests/benchmarks/bench_server.py). Meanwhile other connections wait at most that one fast inference; a slow
inference (or `delay_s`) sends the following ones back to the worker, and the first ones always go there.

Each connection is a `Session`: its own `Policy` object over the shared model (frame/state history, seeded
noise generator) and, for a history head (lstm / gpt), its own copy of the small head with its memory,
installed on the model before each of its requests. A connection's state is dropped when it closes, whether
or not a request was running.

Shutdown (`stop()`, or SIGINT/SIGTERM under `run`): stop accepting, let in-flight requests finish and send
their replies (new ones are refused with an error), then close every connection and release the port.
"""

from __future__ import annotations

import asyncio
import copy
import os
import signal
import socket
import sys
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from vla_scale.policy import Policy
from vla_scale.serve import protocol as proto

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # 16 MiB: two 1024 px frames fit; larger requests get an error reply
HARD_LIMIT_FACTOR = 4  # beyond this multiple the websocket layer closes the connection (code 1009) unread
MAX_IMAGE_SIDE = 4096
SHUTDOWN_GRACE_S = 30.0  # how long in-flight requests may take to finish at shutdown
# How long a connection closed at shutdown waits for the client's closing handshake. An idle PolicyClient reads
# its socket only during a request (transport.py), so it never answers: websockets' default 10 s per shutdown
# was pure waiting. Past this the TCP connection is dropped; the client's next call gets ConnectionClosed.
CLOSE_TIMEOUT_S = 1.0
INLINE_BELOW_S = 0.05  # default inline_below_s: the longest a fast inference may hold up the event loop
INLINE_WINDOW = 8  # inferences that must all have been fast before one runs on the event loop


@dataclass
class Session:
    """One connection's episode: a Policy over the shared model, and its own history head if the model has one."""

    policy: Policy
    head: Any = None  # a per-connection copy of a stepwise action head (its memory is the episode's)


class PolicyServer:
    """Serve `policy` on ws://host:port (port 0: a free one, see `.port` once started)."""

    def __init__(
        self,
        policy: Policy,
        host: str = "127.0.0.1",
        port: int = 0,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        delay_s: float = 0.0,
        control_rate_hz: float | None = None,
        name: str = "",
        shutdown_grace_s: float = SHUTDOWN_GRACE_S,
        inline_below_s: float = INLINE_BELOW_S,
    ) -> None:
        self.policy = policy
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.delay_s = delay_s  # artificial inference time (tests, benchmarks of slow policies)
        self.control_rate_hz = control_rate_hz
        self.name = name
        self.shutdown_grace_s = shutdown_grace_s  # then a stuck inference is abandoned, not waited for
        self.inline_below_s = inline_below_s  # 0: every inference on the worker thread
        self._recent: deque[float] = deque(maxlen=INLINE_WINDOW)  # seconds of the last inferences
        self.inlined = 0  # requests run on the event loop (reported by health)
        self.cameras = [c for c in (policy.static_camera, policy.wrist_camera) if c]
        self._stepwise = bool(getattr(policy.model, "stepwise", False))
        self._base_head = policy.model.action_head if self._stepwise else None
        self._state_required = policy.model.state_encoder is not None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="policy-inference")
        self._sessions: dict[int, Session] = {}
        self._inflight: set[asyncio.Future] = set()
        self._stopping = False
        self.abandoned = False  # set at shutdown when an inference outlived the grace
        self.close_s = 0.0  # how long closing the connections took at shutdown
        self._served = 0
        self._connections = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}"

    def metadata(self) -> dict:
        """What a client needs to build observations and use the actions; sent on connect."""
        p = self.policy
        data = p.spec.get("data", {})
        size = getattr(getattr(p.model, "adapter", None), "image_processor", None)
        size = getattr(size, "size", None)
        return {
            "type": "metadata",
            "protocol": proto.PROTOCOL_VERSION,
            "policy": self.name,
            "cameras": self.cameras,
            "static_camera": p.static_camera,
            "wrist_camera": p.wrist_camera,
            "image": {
                "dtype": "uint8",
                "layout": "HWC RGB",
                "max_side": MAX_IMAGE_SIDE,
                "model_input": dict(size) if isinstance(size, dict) else None,  # frames are resized to this
            },
            "state": {"dim": p.state_dim, "dtype": "float32", "required": self._state_required},
            "action": {"dim": p.action_dim, "dtype": "float32", "space": str(p.model.cfg.action_space)},
            "spaces": data.get("spaces") or {},
            "chunk_size": p.chunk_size,
            "window_size": p.window_size,
            "stepwise": self._stepwise,
            "control_rate_hz": self.control_rate_hz,
            "instruction": {"type": "str", "encodings": list(proto.INSTRUCTION_ENCODINGS)},
            "max_message_bytes": self.max_message_bytes,
        }

    # ----- running -----------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> PolicyServer:
        """Serve in a background thread (tests, notebooks); returns once the port is bound."""
        self._thread = threading.Thread(target=self._thread_main, name="policy-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"the policy server did not start: {self._error!r}")
        return self

    def _thread_main(self) -> None:
        try:
            asyncio.run(self.serve())
        except BaseException as err:  # noqa: BLE001 - reported to start() / stop()
            self._error = err
            self._ready.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Shut a `start()`ed server down (thread-safe): in-flight requests are answered, the port is released."""
        if self._loop is not None and self._stop_event is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._stop_event.set)
            except RuntimeError:
                pass  # the loop already finished
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> PolicyServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, announce: bool = True) -> None:
        """Serve in this thread until SIGINT/SIGTERM (the `vla-scale serve` command)."""

        async def main() -> None:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, on_signal)
            await self.serve(announce)

        def on_signal() -> None:
            if self._stopping:  # a second signal: do not wait for the in-flight requests
                print("policy server: second signal, exiting now", flush=True)
                sys.stderr.flush()
                os._exit(1)
            if self._stop_event is not None:
                self._stop_event.set()

        asyncio.run(main())
        if self.abandoned:  # the interpreter would join the stuck inference thread at exit
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)

    async def serve(self, announce: bool = False) -> None:
        """Serve until `stop()`; then finish in-flight requests and close every connection."""
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        hard = self.max_message_bytes * HARD_LIMIT_FACTOR
        # No websocket pings: PolicyClient reads its socket only while it waits for a reply (transport.py), so an
        # idle robot could not answer them; TCP keepalive (`_keepalive`) finds dead peers instead.
        server_cm = serve(
            self._handle, self.host, self.port, max_size=hard, compression=None, ping_interval=None,
            close_timeout=CLOSE_TIMEOUT_S,
        )  # fmt: skip
        async with server_cm as server:
            self.port = int(next(iter(server.sockets)).getsockname()[1])
            if announce:
                print(f"serving {self.name or 'policy'} on {self.url} (Ctrl-C to stop)", flush=True)
            self._ready.set()
            await self._stop_event.wait()
            self._stopping = True
            server.server.close()  # stop accepting; open connections still get their replies
            if self._inflight:
                await asyncio.wait(set(self._inflight), timeout=self.shutdown_grace_s)
            stuck = bool(self._inflight)
            for future in list(self._inflight):  # release its handler, or wait_closed() waits for the model
                future.cancel()
            closing = time.perf_counter()
            server.close(close_connections=True)  # idempotent: this is the only call that closes connections
            await server.wait_closed()
            self.close_s = time.perf_counter() - closing  # clients that do not answer the close: CLOSE_TIMEOUT_S
        # An inference still running after the grace is abandoned: waiting for it could block forever.
        self._worker.shutdown(wait=not stuck, cancel_futures=True)
        self.abandoned = stuck
        if stuck:
            print(f"policy server: an inference still ran after {self.shutdown_grace_s:g} s; not waiting", flush=True)
        if announce:
            print(f"policy server stopped (connections closed in {self.close_s:.1f} s)", flush=True)

    # ----- per connection ----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        key = id(ws)
        _keepalive(ws.transport.get_extra_info("socket"))
        self._connections += 1
        try:
            await ws.send(proto.pack(self.metadata()))
            async for frame in ws:
                reply = await self._reply(key, frame)
                await ws.send(proto.pack(reply))
        except ConnectionClosed:
            pass  # the client went away (possibly mid-request: its reply is dropped)
        finally:
            self._sessions.pop(key, None)  # the episode state goes with the connection
            self._connections -= 1

    async def _reply(self, key: int, frame: bytes | str) -> dict:
        request_id = None
        try:
            if len(frame) > self.max_message_bytes:
                raise proto.RequestError(
                    "message", f"{len(frame)} bytes exceeds the server's limit of {self.max_message_bytes} bytes"
                )
            message = proto.unpack(frame)
            request_id = message.get("id")
            kind = proto.parse_request(message)
            if kind == "health":
                return self._health(request_id)
            if kind == "metadata":
                return {**self.metadata(), "id": request_id}
            if self._stopping:
                raise proto.RequestError("type", f"the server is shutting down; {kind} refused")
            if kind == "reset":
                seed = proto.parse_seed(message)
                await self._run(key, lambda policy: policy.reset(seed))
                return {"type": "reset", "id": request_id}
            obs = message.get("obs")
            if not isinstance(obs, dict):
                raise proto.RequestError("obs", "expected a map with images, state and instruction")
            images = proto.parse_images(obs, self.cameras, MAX_IMAGE_SIDE)
            state = proto.parse_state(obs, self.policy.state_dim, self._state_required)
            instruction = proto.parse_instruction(obs)
            seed = proto.parse_seed(message)
            frames: Any = images if self.policy.wrist_camera else images[self.cameras[0]]
            start = time.perf_counter()
            actions = await self._run(key, lambda policy: policy.predict(frames, instruction, state, seed=seed))
            ms = (time.perf_counter() - start) * 1e3
            return {"type": "actions", "id": request_id, "actions": np.asarray(actions, np.float32), "server_ms": ms}
        except proto.RequestError as err:
            return proto.error_reply(err.field, err.message, request_id)
        except (ValueError, KeyError) as err:  # refused by the policy itself
            return proto.error_reply("obs", str(err), request_id)
        except Exception as err:  # noqa: BLE001 - the model failed: tell this client, keep serving the others
            return proto.error_reply("server", f"inference failed: {type(err).__name__}: {err}", request_id)

    def _health(self, request_id: Any) -> dict:
        return {
            "type": "health",
            "id": request_id,
            "status": "stopping" if self._stopping else "ok",
            "connections": self._connections,
            "sessions": len(self._sessions),  # connections holding episode state (after their first reset/infer)
            "busy": bool(self._inflight),
            "served": self._served,
            "inlined": self.inlined,  # of those, run on the event loop (fast model: module docstring)
        }

    async def _run(self, key: int, fn: Any) -> Any:
        """`fn(session.policy)` on the inference thread, with this connection's episode state installed (or on the
        event loop for a fast model with the worker idle: module docstring)."""
        assert self._loop is not None
        if self._inline():
            self.inlined += 1
            return self._in_session(key, fn)
        future = self._loop.run_in_executor(self._worker, self._in_session, key, fn)
        self._inflight.add(future)
        try:
            return await asyncio.shield(future)  # a dropped connection must not cancel the model mid-call
        finally:
            self._inflight.discard(future)

    def _in_session(self, key: int, fn: Any) -> Any:
        session = self._sessions.get(key)
        if session is None:
            head = copy.deepcopy(self._base_head) if self._base_head is not None else None
            if head is not None:
                self.policy.model.action_head = head
            p = self.policy
            session = Session(Policy(p.model, p.normalizer, p.spec, p.device), head)
            self._sessions[key] = session
        elif session.head is not None:
            self.policy.model.action_head = session.head
        start = time.perf_counter()
        try:
            if self.delay_s:
                time.sleep(self.delay_s)
            out = fn(session.policy)
        finally:
            self._recent.append(time.perf_counter() - start)
        self._served += 1
        return out

    def _inline(self) -> bool:
        """Whether the next inference may run on the event loop: recent ones were all fast, none is in flight."""
        recent = self._recent
        return (
            not self._inflight
            and self.inline_below_s > 0
            and len(recent) == recent.maxlen
            and max(recent) < self.inline_below_s
        )


def _keepalive(sock: Any) -> None:
    """Kernel keepalive probes after 30 s of silence, every 10 s; 3 unanswered drop the connection (and with it
    the episode): a client whose machine vanished is noticed in ~1 min without any work by the client."""
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):  # Linux; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def load_server(export: str | Path, device: str = "cpu", **kwargs: Any) -> PolicyServer:
    """A server for an export folder (or a run directory, exported on load)."""
    return PolicyServer(Policy.from_pretrained(export, device=device), name=str(export), **kwargs)
