"""`Connection`: a blocking websocket client connection read by the thread that waits for the reply.

Why not `websockets.sync.client`: it reads the socket on a background thread and hands every message to the
caller through a queue, so each reply needs one more thread wake-up, and on a loaded machine every wake-up waits
for a time slice. Against in-process `Policy.predict` (tiny model, tests/benchmarks/bench_server.py's calls
interleaved, load average ~6.5 on 2 cores) the server's median overhead per call went from +15% to +8% and from
+26% to +23% in two runs with this connection instead.
Here websockets' own protocol implementation (Sans-I/O `ClientProtocol`: handshake, masking, framing, close
handshake, answering pings) runs over a plain socket in the caller's thread.

The price: nothing reads the socket between requests, so an idle connection cannot answer websocket pings. The
policy server therefore sends none and keeps dead peers out with TCP keepalive, which the kernel answers
(vla_scale/serve/server.py). Other websocket clients (websockets' own, browsers) work with it unchanged.
"""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError, InvalidState
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

RECV_BYTES = 1 << 20  # one 224 px request is ~0.3 MB; replies are a few hundred bytes
CLOSE_TIMEOUT_S = 2.0


class Connection:
    """ws://host:port opened (handshake done) within `open_timeout` seconds; messages larger than `max_size`
    bytes (None: any size) fail the connection, as in websockets' own clients."""

    def __init__(self, url: str, open_timeout: float | None = 60.0, max_size: int | None = 2**20) -> None:
        uri = parse_uri(url)
        if uri.secure:
            raise ValueError(f"{url}: wss:// is not supported; the policy server speaks ws:// (loopback or a LAN)")
        self._sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests are single writes: no Nagle
        self._protocol = ClientProtocol(uri, max_size=max_size)
        self._messages: deque[bytes | str] = deque()
        self._parts: list[bytes] = []  # a fragmented message being reassembled
        self._text = False
        self._response: Response | None = None
        try:
            self._protocol.send_request(self._protocol.connect())
            self._flush()
            deadline = None if open_timeout is None else time.monotonic() + open_timeout
            while self._response is None and self._protocol.handshake_exc is None:
                self._read(deadline, "the opening handshake")
        except BaseException:
            self._sock.close()
            raise
        if self._protocol.handshake_exc is not None:
            self._sock.close()
            raise self._protocol.handshake_exc

    def send(self, message: bytes | str) -> None:
        """One message: bytes as a binary frame, str as a text frame."""
        self._sock.settimeout(None)  # a recv timeout must not cut a large request short
        try:
            if isinstance(message, str):
                self._protocol.send_text(message.encode())
            else:
                self._protocol.send_binary(message)
        except InvalidState:
            raise self._closed() from None
        try:
            self._flush()
        except OSError:  # the peer is gone; its close frame, if any, is read below
            raise self._closed() from None

    def recv(self, timeout: float | None = None) -> bytes | str:
        """The next message; `TimeoutError` after `timeout` seconds (the connection stays usable: a message
        that arrives later is returned by the next call), `ConnectionClosed` once the connection is closed."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._messages:
            if self._protocol.state is State.CLOSED:
                raise self._protocol.close_exc
            self._read(deadline, "a reply")
        return self._messages.popleft()

    def close(self) -> None:
        """Closing handshake (briefly waited for), then the socket is closed."""
        with contextlib.suppress(OSError, InvalidState, TimeoutError):
            if self._protocol.state is State.OPEN:
                self._protocol.send_close(CloseCode.NORMAL_CLOSURE)
                self._flush()
            deadline = time.monotonic() + CLOSE_TIMEOUT_S
            while self._protocol.state is not State.CLOSED:
                self._read(deadline, "the closing handshake")
        self._sock.close()

    def abort(self) -> None:
        """Wake a thread blocked in `recv` (it raises `ConnectionClosed`) and drop the connection."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _read(self, deadline: float | None, what: str) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError(f"no {what} from the policy server in time")
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(RECV_BYTES)
        except TimeoutError:
            raise TimeoutError(f"no {what} from the policy server in time") from None
        except OSError:
            data = b""
        if data:
            self._protocol.receive_data(data)
        else:
            self._protocol.receive_eof()
        for event in self._protocol.events_received():
            if isinstance(event, Response):
                self._response = event
            elif isinstance(event, Frame):
                self._frame(event)
        with contextlib.suppress(OSError):
            self._flush()  # pongs, our half of a closing handshake the server started
        if not data and self._protocol.state is not State.CLOSED:
            self._protocol.state = State.CLOSED  # EOF during the handshake: nothing more will come

    def _frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._parts, self._text = [bytes(frame.data)], frame.opcode is Opcode.TEXT
        elif frame.opcode is Opcode.CONT:
            self._parts.append(bytes(frame.data))
        else:
            return  # ping / pong / close: the protocol answered them
        if frame.fin:
            data = b"".join(self._parts)
            self._messages.append(data.decode() if self._text else data)
            self._parts = []

    def _flush(self) -> None:
        for data in self._protocol.data_to_send():
            if data:
                self._sock.sendall(data)
            else:  # SEND_EOF: half-close after our close frame
                with contextlib.suppress(OSError):
                    self._sock.shutdown(socket.SHUT_WR)

    def _closed(self) -> ConnectionClosedError:
        if self._protocol.state is State.CLOSED:
            return self._protocol.close_exc  # type: ignore[return-value]
        with contextlib.suppress(OSError, TimeoutError):  # read what the server said before it went
            self._read(time.monotonic() + CLOSE_TIMEOUT_S, "the closing handshake")
        if self._protocol.state is State.CLOSED:
            return self._protocol.close_exc  # type: ignore[return-value]
        return ConnectionClosedError(None, None)
