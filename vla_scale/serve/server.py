"""`PolicyServer`: one exported policy behind a websocket, one episode per connection.

A thread per connection reads its requests, checks them and runs the inference itself; one lock on the model
serves the requests of all connections one at a time, while the other threads keep answering health checks,
metadata and bad requests. Why no event loop: a request then costs no hand-off between threads, and the
reading is `FrameStream`'s (frames.py) instead of websockets' asyncio stack. With the same client in the same
benchmark runs (tests/benchmarks/bench_server.py, tiny 5 ms model), the overhead over in-process
`Policy.predict` was +8.4%, +9.7% and +10.1% against +10.5%, +10.8% and +12.6% for the asyncio server.
websockets still does the opening handshake (its Sans-I/O `ServerProtocol`). A robot fleet is tens of
connections, not thousands: a thread each is cheap (`max_connections` caps them).

Each connection is a `Session`: its own `Policy` object over the shared model (frame/state history, seeded
noise generator) and, for a history head (lstm / gpt), its own copy of the small head with its memory,
installed on the model before each of its requests. A connection's state is dropped when it closes, whether
or not a request was running.

Shutdown (`stop()`, or SIGINT/SIGTERM under `run`): stop accepting, let in-flight requests finish and send
their replies (new ones are refused with an error), then close every connection and release the port.
"""

from __future__ import annotations

import contextlib
import copy
import os
import select
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.http11 import Request
from websockets.server import ServerProtocol

from vla_scale.policy import Policy
from vla_scale.serve import protocol as proto
from vla_scale.serve.frames import FrameStream, read_http_head

DEFAULT_MAX_MESSAGE_BYTES = 16 * 2**20  # 16 MiB: two 1024 px frames fit; larger requests get an error reply
HARD_LIMIT_FACTOR = 4  # beyond this multiple the connection is closed (code 1009) with the message unread
MAX_IMAGE_SIDE = 4096
SHUTDOWN_GRACE_S = 30.0  # how long in-flight requests may take to finish at shutdown
# How long a connection closed at shutdown waits for the client's closing handshake. An idle PolicyClient reads
# its socket only during a request (transport.py), so it never answers; past this the TCP connection is
# dropped and the client's next call gets ConnectionClosed.
CLOSE_TIMEOUT_S = 1.0
OPEN_TIMEOUT_S = 10.0  # for a new connection's opening handshake
MAX_CONNECTIONS = 64  # default: more are refused at the handshake (HTTP 503), each would hold a thread


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
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.policy = policy
        self.host, self.port = host, port
        self.max_message_bytes = max_message_bytes
        self.delay_s = delay_s  # artificial inference time (tests, benchmarks of slow policies)
        self.control_rate_hz = control_rate_hz
        self.name = name
        self.shutdown_grace_s = shutdown_grace_s  # then a stuck inference is abandoned, not waited for
        self.max_connections = max_connections
        self.cameras = [c for c in (policy.static_camera, policy.wrist_camera) if c]
        self._stepwise = bool(getattr(policy.model, "stepwise", False))
        self._base_head = policy.model.action_head if self._stepwise else None
        self._state_required = policy.model.state_encoder is not None
        self._inpainting = policy.can_inpaint
        self._model = threading.Lock()  # one inference at a time, whichever connection asks
        self._sessions: dict[int, Session] = {}
        self._streams: dict[int, FrameStream] = {}  # open connections
        self._busy: set[int] = set()  # connections between a request and its reply
        self._admitted = 0  # connections past the limit check (handshaking or open)
        self._state = threading.Condition()  # guards _streams, _busy and _admitted
        self._stopping = False
        self.abandoned = False  # set at shutdown when an inference outlived the grace
        self.close_s = 0.0  # how long closing the connections took at shutdown
        self._served = 0
        self._stop_requested = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()  # interrupts the accept loop's select
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
            "inpainting": self._inpainting,  # infer accepts a prefix (real-time chunking, flow policies)
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
            self.serve()
        except BaseException as err:  # noqa: BLE001 - reported to start() / stop()
            self._error = err
            self._ready.set()

    def stop(self, timeout: float = 60.0) -> None:
        """Shut a `start()`ed server down (thread-safe): in-flight requests are answered, the port is released."""
        self._request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def _request_stop(self) -> None:
        self._stop_requested.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def __enter__(self) -> PolicyServer:
        return self.start() if self._thread is None else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def run(self, announce: bool = True) -> None:
        """Serve in this thread until SIGINT/SIGTERM (the `vla-scale serve` command)."""

        def on_signal(signum: int, frame: object) -> None:
            if self._stop_requested.is_set():  # a second signal: do not wait for the in-flight requests
                print("policy server: second signal, exiting now", flush=True)
                sys.stderr.flush()
                os._exit(1)
            self._request_stop()

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
        self.serve(announce)
        if self.abandoned:  # the interpreter would wait for the stuck inference thread at exit
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)

    def serve(self, announce: bool = False) -> None:
        """Accept connections until `stop()`; then finish in-flight requests and close every connection."""
        listener = socket.create_server((self.host, self.port), backlog=128)  # SO_REUSEADDR on POSIX
        listener.setblocking(False)
        try:
            self.port = int(listener.getsockname()[1])
            if announce:
                print(f"serving {self.name or 'policy'} on {self.url} (Ctrl-C to stop)", flush=True)
            self._ready.set()
            while not self._stop_requested.is_set():
                ready, _, _ = select.select([listener, self._wake_r], [], [])
                if listener in ready and not self._stop_requested.is_set():
                    with contextlib.suppress(BlockingIOError, ConnectionError):  # the client already left
                        sock, _ = listener.accept()
                        threading.Thread(target=self._connection, args=(sock,), name="policy-conn", daemon=True).start()
        finally:
            listener.close()  # stop accepting; open connections still get their replies
        self._shutdown()
        self._wake_r.close(), self._wake_w.close()
        if self.abandoned:
            print(f"policy server: an inference still ran after {self.shutdown_grace_s:g} s; not waiting", flush=True)
        if announce:
            print(f"policy server stopped (connections closed in {self.close_s:.1f} s)", flush=True)

    def _shutdown(self) -> None:
        with self._state:
            self._stopping = True  # requests from here on are refused
            self._state.wait_for(lambda: not self._busy, timeout=self.shutdown_grace_s)
            stuck = set(self._busy)
            streams = dict(self._streams)
        closing = time.perf_counter()
        for key, stream in streams.items():
            if key in stuck:  # its inference outlived the grace: drop the connection, the client hears of it
                stream.abort()
            else:
                stream.start_close(CloseCode.GOING_AWAY, "server shutting down")
        with self._state:  # each connection's thread ends once its client answers the close (or the timeout)
            self._state.wait_for(lambda: set(self._streams) <= stuck, timeout=CLOSE_TIMEOUT_S)
            late = [s for k, s in self._streams.items() if k not in stuck]
        for stream in late:
            stream.abort()
        with self._state:
            self._state.wait_for(lambda: set(self._streams) <= stuck, timeout=CLOSE_TIMEOUT_S)
        self.close_s = time.perf_counter() - closing
        self.abandoned = bool(stuck)

    # ----- per connection ----------------------------------------------------------------------

    def _connection(self, sock: socket.socket) -> None:
        """A connection's thread: opening handshake, metadata, then request after request until it closes."""
        with self._state:  # a slot is taken here, before the handshake, so the limit holds under a burst
            refused = self._refusal()
            self._admitted += refused is None
        stream = None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # replies are single writes: no Nagle
            _keepalive(sock)
            stream = _handshake(sock, self.max_message_bytes * HARD_LIMIT_FACTOR, refused)
        except (OSError, EOFError, ValueError):
            sock.close()
        if stream is None:
            with self._state:
                self._admitted -= refused is None
            return
        key = id(stream)
        with self._state:
            if self._stopping:  # shutdown began during the handshake and no longer sees this connection
                self._admitted -= 1
                stream.abort()
                return
            self._streams[key] = stream
        try:
            stream.send(proto.pack(self.metadata()))
            while True:
                frame = stream.recv()
                with self._state:
                    self._busy.add(key)
                try:
                    reply = self._reply(key, frame)
                    with proto.packed(reply) as data:
                        stream.send(data)
                finally:
                    with self._state:
                        self._busy.discard(key)
                        self._state.notify_all()
        except (ConnectionClosed, OSError):
            pass  # the client went away (possibly mid-request: its reply is dropped), or the server closed it
        finally:
            self._sessions.pop(key, None)  # the episode state goes with the connection
            stream.abort()
            with self._state:
                self._streams.pop(key, None)
                self._admitted -= 1
                self._state.notify_all()

    def _refusal(self) -> str | None:
        """Why a new connection is refused now (None: accepted); called holding `_state`."""
        if self._stopping:
            return "the policy server is shutting down"
        if self._admitted >= self.max_connections:
            return f"the policy server is at its limit of {self.max_connections} connections"
        return None

    def _reply(self, key: int, frame: bytes | str) -> dict:
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
                self._run(key, lambda policy: policy.reset(seed))
                return {"type": "reset", "id": request_id}
            obs = message.get("obs")
            if not isinstance(obs, dict):
                raise proto.RequestError("obs", "expected a map with images, state and instruction")
            images = proto.parse_images(obs, self.cameras, MAX_IMAGE_SIDE)
            state = proto.parse_state(obs, self.policy.state_dim, self._state_required)
            instruction = proto.parse_instruction(obs)
            seed = proto.parse_seed(message)
            p = self.policy
            prefix, delay = proto.parse_prefix(message, p.chunk_size, p.action_dim, self._inpainting)
            frames: Any = images if p.wrist_camera else images[self.cameras[0]]
            start = time.perf_counter()
            actions = self._run(
                key, lambda policy: policy.predict(frames, instruction, state, seed, prefix=prefix, prefix_delay=delay)
            )
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
            "connections": len(self._streams),
            "sessions": len(self._sessions),  # connections holding episode state (after their first reset/infer)
            "busy": self._model.locked(),  # an inference is running
            "served": self._served,
        }

    def _run(self, key: int, fn: Any) -> Any:
        """`fn(session.policy)` under the model lock, with this connection's episode state installed."""
        with self._model:
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
            if self.delay_s:
                time.sleep(self.delay_s)
            out = fn(session.policy)
            self._served += 1
            return out


def _handshake(sock: socket.socket, max_size: int, refused: str | None) -> FrameStream | None:
    """The opening handshake by websockets' `ServerProtocol`; None (connection closed) if it was refused, by
    websockets (not a websocket request) or by the server (`refused`: HTTP 503 with that reason)."""
    head, rest = read_http_head(sock, time.monotonic() + OPEN_TIMEOUT_S)
    protocol = ServerProtocol(max_size=max_size)
    protocol.receive_data(head)
    request = next((e for e in protocol.events_received() if isinstance(e, Request)), None)
    if request is not None:
        response = protocol.accept(request)  # 101, or an HTTP error saying what was wrong with the request
        if response.status_code == 101 and refused:
            response = protocol.reject(HTTPStatus.SERVICE_UNAVAILABLE, refused + "\n")
        protocol.send_response(response)
    for data in protocol.data_to_send():
        if data:
            sock.sendall(data)
    if request is None or response.status_code != 101:
        sock.close()
        return None
    return FrameStream(sock, client=False, max_size=max_size, pending=rest)


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
