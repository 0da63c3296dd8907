"""`Connection`: a blocking websocket client connection read by the thread that waits for the reply.

Why not `websockets.sync.client`: it reads the socket on a background thread and hands every message to the
caller through a queue, so each reply needs one more thread wake-up, and on a loaded machine every wake-up waits
for a time slice. Against in-process `Policy.predict` (tiny model, tests/benchmarks/bench_server.py's calls
interleaved, load average ~6.5 on 2 cores) the server's median overhead per call went from +15% to +8% and from
+26% to +23% in two runs with this connection instead.
Here websockets' own handshake code (Sans-I/O `ClientProtocol`) opens the connection over a plain socket, and
`FrameStream` (frames.py: masking, framing, pings, the closing handshake) carries the messages in the caller's
thread.

The price: nothing reads the socket between requests, so an idle connection cannot answer websocket pings. The
policy server therefore sends none and keeps dead peers out with TCP keepalive, which the kernel answers
(vla_scale/serve/server.py). It also talks to other websocket servers (websockets' own: tests/serve/
test_transport.py), and other websocket clients talk to the policy server unchanged (tests/serve/test_frames.py).
"""

from __future__ import annotations

import socket
import time

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosedError
from websockets.http11 import Response
from websockets.uri import parse_uri

from vla_scale.serve.frames import FrameStream, read_http_head

CLOSE_TIMEOUT_S = 2.0


class Connection:
    """ws://host:port opened (handshake done) within `open_timeout` seconds; messages larger than `max_size`
    bytes (None: any size) fail the connection, as in websockets' own clients."""

    def __init__(self, url: str, open_timeout: float | None = 60.0, max_size: int | None = 2**20) -> None:
        uri = parse_uri(url)
        if uri.secure:
            raise ValueError(f"{url}: wss:// is not supported; the policy server speaks ws:// (loopback or a LAN)")
        deadline = None if open_timeout is None else time.monotonic() + open_timeout
        sock = socket.create_connection((uri.host, uri.port), timeout=open_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # requests are single writes: no Nagle
            protocol = ClientProtocol(uri)
            protocol.send_request(protocol.connect())
            for data in protocol.data_to_send():
                sock.sendall(data)
            try:
                head, rest = read_http_head(sock, deadline)
            except (EOFError, ValueError) as err:
                raise ConnectionClosedError(None, None) from err
            protocol.receive_data(head)
            if not protocol.events_received():  # not a 101: websockets reads the refusal's body, then raises
                protocol.receive_data(rest)
                _read_refusal(sock, protocol, deadline)
            if protocol.handshake_exc is not None:
                raise protocol.handshake_exc
        except BaseException:
            sock.close()
            raise
        self._stream = FrameStream(sock, client=True, max_size=max_size, pending=rest)

    def send(self, message: bytes | memoryview | str) -> None:
        """One message: bytes (or a buffer) as a binary frame, str as a text frame."""
        try:
            self._stream.send(message)
        except OSError:  # the peer is gone; its close frame, if any, is read below
            raise self._closed() from None

    def recv(self, timeout: float | None = None) -> bytes | str:
        """The next message; `TimeoutError` after `timeout` seconds (the connection stays usable: a message
        that arrives later is returned by the next call), `ConnectionClosed` once the connection is closed."""
        try:
            return self._stream.recv(None if timeout is None else time.monotonic() + timeout)
        except TimeoutError:
            raise TimeoutError("no reply from the policy server in time") from None

    def close(self) -> None:
        """Closing handshake (briefly waited for), then the socket is closed."""
        self._stream.close(timeout=CLOSE_TIMEOUT_S)

    def abort(self) -> None:
        """Wake a thread blocked in `recv` (it raises `ConnectionClosed`) and drop the connection."""
        self._stream.abort()

    def _closed(self) -> ConnectionClosedError:
        stream = self._stream
        if not stream.closed:  # read what the server said before it went
            stream.finish_close(time.monotonic() + CLOSE_TIMEOUT_S)
        return stream.closed_exception()


def _read_refusal(sock: socket.socket, protocol: ClientProtocol, deadline: float | None) -> None:
    """The rest of a refused handshake's HTTP response (its body says why), until websockets has parsed it."""
    while protocol.handshake_exc is None and not any(isinstance(e, Response) for e in protocol.events_received()):
        sock.settimeout(None if deadline is None else max(1e-3, deadline - time.monotonic()))
        data = sock.recv(4096)
        if data:
            protocol.receive_data(data)
        else:
            protocol.receive_eof()
            if protocol.handshake_exc is None:
                raise ConnectionClosedError(None, None)
