"""`FrameStream`: websocket messages (RFC 6455 framing) over a blocking socket, after the opening handshake.

Why not websockets' own protocol object for the frames (it still does both ends' opening handshakes,
transport.py and server.py): its parser copies a request's 300 KB several times on the way in (into its stream
buffer, out of it, unmasked into a new object) and its writer twice more on the way out, and every byte passes
through generator coroutines. After a 4.5 ms inference those copies run on cold caches: websockets' parser took
0.054 ms from the socket read to the frame, and with this module writing the client's frames the server's round
trip overhead fell by about 2 points of the tiny model's inference (README, "Policy server"). Here a frame is
read into one kept buffer with `recv_into`, unmasked once into the message (websockets' C `apply_mask`), and
written with one `sendmsg` of header and payload.

What the RFC asks of an endpoint and is done here: masked frames from clients only (a server refuses unmasked
ones, a client masked ones), no reserved bits (no extension is ever negotiated), control frames of at most
125 bytes and never fragmented, fragmented messages reassembled, text checked as UTF-8 (1007), pings answered
with pongs, a size limit checked on the frame header before the payload is read (1009), and the closing
handshake: a close frame is answered with one and the stream is closed; `ConnectionClosed` (websockets' own
exception types, so callers see what websockets' clients raise) carries both close frames.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK
from websockets.frames import Close, CloseCode, Opcode

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

MAX_CONTROL = 125
OK_CODES = (CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY, CloseCode.NO_STATUS_RCVD)
# The read buffer starts at this size and grows to the largest frame seen, where it stays: after the first
# request, a 224 px two-camera one (~0.3 MB) arrives in one read. Idle connections hold only this much.
BUFFER_BYTES = 1 << 16
ANY_SIZE = 1 << 31  # what max_size=None still refuses: a length no policy message has, from a broken or hostile peer


class FrameError(Exception):
    """The peer broke the protocol; the stream is failed with `code`."""

    def __init__(self, code: CloseCode, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


class FrameStream:
    """Messages over `sock` (handshake already done). `client`: this end masks what it sends and expects unmasked
    frames; a server the opposite. Messages over `max_size` bytes (None: `ANY_SIZE`) fail the stream with 1009.

    One thread may `recv` at a time; `send` and `close` may come from any thread (a lock keeps frames whole)."""

    def __init__(self, sock: socket.socket, client: bool, max_size: int | None, pending: bytes = b"") -> None:
        self.sock = sock
        self.client = client
        self.max_size = max_size
        self._buf = bytearray(max(BUFFER_BYTES, len(pending)))
        self._buf[: len(pending)] = pending  # bytes read past the end of the handshake
        self._start, self._end = 0, len(pending)  # unread bytes: _buf[_start:_end]
        self._parts: list[bytes] = []  # fragments of a message not yet complete
        self._text = False
        self._size = 0
        self._send_lock = threading.Lock()
        self.close_sent: Close | None = None
        self.close_rcvd: Close | None = None
        self._rcvd_then_sent: bool | None = None
        self._eof = False

    # ----- receiving ---------------------------------------------------------------------------

    def recv(self, deadline: float | None = None) -> bytes | str:
        """The next message (bytes for binary, str for text). `TimeoutError` past `deadline` (time.monotonic())
        leaves the stream usable; `ConnectionClosed` once the closing handshake is done or the peer is gone."""
        while True:
            if self._eof or self.close_rcvd is not None:
                raise self.closed_exception()
            try:
                message = self._next_message(deadline)
            except FrameError as err:
                self.fail(err.code, err.reason)
                raise self.closed_exception() from None
            if message is not None:
                return message

    def _next_message(self, deadline: float | None) -> bytes | str | None:
        """One frame read and handled; the message once its last frame is in, else None."""
        self._fill(2, deadline)
        buf, at = self._buf, self._start
        b0, b1 = buf[at], buf[at + 1]
        fin, opcode, masked, length = bool(b0 & 0x80), b0 & 0x0F, bool(b1 & 0x80), b1 & 0x7F
        if b0 & 0x70:
            raise FrameError(CloseCode.PROTOCOL_ERROR, "reserved bits must be 0 (no extension was negotiated)")
        if masked == self.client:
            side = "a server's frames must not" if self.client else "a client's frames must"
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"{side} be masked")
        extra = 2 if length == 126 else 8 if length == 127 else 0
        header = 2 + extra + (4 if masked else 0)
        self._fill(header, deadline)
        buf, at = self._buf, self._start  # _fill may have moved the bytes
        if extra:
            length = int.from_bytes(buf[at + 2 : at + 2 + extra], "big")
        try:
            kind = Opcode(opcode)
        except ValueError:
            raise FrameError(CloseCode.PROTOCOL_ERROR, f"unknown opcode {opcode:#x}") from None
        control = kind in (Opcode.CLOSE, Opcode.PING, Opcode.PONG)
        if control and (length > MAX_CONTROL or not fin):
            raise FrameError(CloseCode.PROTOCOL_ERROR, "control frames are at most 125 bytes and not fragmented")
        if not control:
            if (kind is Opcode.CONT) != bool(self._parts):
                what = "continuation frame without a message" if kind is Opcode.CONT else "new message in a fragment"
                raise FrameError(CloseCode.PROTOCOL_ERROR, f"unexpected {what}")
            limit = ANY_SIZE if self.max_size is None else self.max_size
            if self._size + length > limit:  # checked before reading it
                raise FrameError(CloseCode.MESSAGE_TOO_BIG, f"over size limit ({self._size + length} > {limit} bytes)")
        self._fill(header + length, deadline)
        at = self._start
        with memoryview(self._buf) as view, view[at + header : at + header + length] as payload:
            data = apply_mask(payload, bytes(view[at + header - 4 : at + header])) if masked else bytes(payload)
        self._start += header + length
        if control:
            self._control(kind, data)
            return None
        if kind is not Opcode.CONT:
            self._text = kind is Opcode.TEXT
        self._parts.append(data)
        self._size += length
        if not fin:
            return None
        message = data if len(self._parts) == 1 else b"".join(self._parts)
        self._parts, self._size = [], 0
        if self._text:
            try:
                return message.decode()
            except UnicodeDecodeError:
                raise FrameError(CloseCode.INVALID_DATA, "text message is not valid UTF-8") from None
        return message

    def _control(self, kind: Opcode, data: bytes) -> None:
        if kind is Opcode.PING:
            with contextlib.suppress(OSError):
                self._send_frame(Opcode.PONG, data)
        elif kind is Opcode.CLOSE:
            try:
                self.close_rcvd = Close.parse(data)
            except Exception:  # noqa: BLE001 - ProtocolError, a bad code or an undecodable reason
                raise FrameError(CloseCode.PROTOCOL_ERROR, "malformed close frame") from None
            if self.close_sent is None:  # answer it, echoing the code
                self._rcvd_then_sent = True
                with contextlib.suppress(OSError):
                    self._send_close(self.close_rcvd, data)
            elif self._rcvd_then_sent is None:
                self._rcvd_then_sent = False

    def _fill(self, n: int, deadline: float | None) -> None:
        """Read from the socket until the next `n` unread bytes are in the buffer."""
        while self._end - self._start < n:
            if self._start and (self._start == self._end or len(self._buf) - self._start < n):
                pending = self._end - self._start  # move the unread bytes to the front
                self._buf[:pending] = self._buf[self._start : self._end]
                self._start, self._end = 0, pending
            if len(self._buf) < n:  # a frame larger than the buffer: grow it to fit (kept for the next ones)
                self._buf.extend(bytes(n - len(self._buf)))
            self._read(deadline)

    def _read(self, deadline: float | None) -> None:
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("no message in time")
        if self.sock.gettimeout() != left:
            self.sock.settimeout(left)
        with memoryview(self._buf) as view:
            try:
                got = self.sock.recv_into(view[self._end :])
            except TimeoutError:
                raise
            except OSError:
                got = 0
        if not got:
            self._eof = True
            raise self.closed_exception()
        self._end += got

    # ----- sending -----------------------------------------------------------------------------

    def send(self, message: bytes | bytearray | memoryview | str) -> None:
        """One message in one frame: str as text, anything else as binary."""
        if self.close_sent is not None or self.close_rcvd is not None or self._eof:
            raise self.closed_exception()
        if self.sock.gettimeout() is not None:
            self.sock.settimeout(None)  # a timeout left by a read must not cut a large message short
        if isinstance(message, str):
            self._send_frame(Opcode.TEXT, message.encode())
        else:
            self._send_frame(Opcode.BINARY, message)

    def _send_frame(self, kind: Opcode, payload: bytes | bytearray | memoryview) -> None:
        n = memoryview(payload).nbytes
        if n < 126:
            header = struct.pack("!BB", 0x80 | kind, n | (0x80 if self.client else 0))
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | kind, 126 | (0x80 if self.client else 0), n)
        else:
            header = struct.pack("!BBQ", 0x80 | kind, 127 | (0x80 if self.client else 0), n)
        if self.client:  # RFC 6455 5.3: a fresh random mask per frame
            mask = os.urandom(4)
            header += mask
            payload = apply_mask(payload, mask)
        with self._send_lock:
            send_all(self.sock, [header, payload] if n else [header])

    def _send_close(self, close: Close, raw: bytes | None = None) -> None:
        self.close_sent = close
        self._send_frame(Opcode.CLOSE, close.serialize() if raw is None else raw)

    # ----- closing -----------------------------------------------------------------------------

    def close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "", timeout: float = 2.0) -> None:
        """Closing handshake from this end: a close frame, the peer's answer awaited up to `timeout` s (other
        messages that arrive meanwhile are dropped), then the socket is closed."""
        self.start_close(code, reason)
        self.finish_close(time.monotonic() + timeout)

    def start_close(self, code: int = CloseCode.NORMAL_CLOSURE, reason: str = "") -> None:
        """Send a close frame (once); whoever reads the stream sees the peer's answer."""
        with contextlib.suppress(OSError):
            if self.close_sent is None and self.close_rcvd is None and not self._eof:
                self._send_close(Close(code, reason))

    def finish_close(self, deadline: float) -> None:
        """Read until the peer's close frame, EOF or `deadline`, then close the socket."""
        with contextlib.suppress(ConnectionClosed, TimeoutError, OSError):
            while True:
                self.recv(deadline)
        self.abort()

    def fail(self, code: CloseCode, reason: str) -> None:
        """The peer broke the protocol or a limit: a close frame saying why, our half closed, the rest of what the
        peer sends read and dropped for a moment (so the close frame is not lost to a reset), the socket closed."""
        self.start_close(code, reason)
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 1.0
        with contextlib.suppress(OSError, TimeoutError):
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv_into(self._buf):
                    break
        self._eof = True
        self.abort()

    def abort(self) -> None:
        """Drop the connection now (a thread blocked in `recv` wakes up with `ConnectionClosed`)."""
        self._eof = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self._eof or self.close_rcvd is not None

    def closed_exception(self) -> ConnectionClosed:
        """What `recv`/`send` raise once the stream is closed: OK after a normal closing handshake."""
        rcvd, sent = self.close_rcvd, self.close_sent
        ok = rcvd is not None and sent is not None and rcvd.code in OK_CODES and sent.code in OK_CODES
        return (ConnectionClosedOK if ok else ConnectionClosedError)(rcvd, sent, self._rcvd_then_sent)


def send_all(sock: socket.socket, buffers: list) -> None:
    """`sendmsg` until every byte of `buffers` is out (one system call in the usual case)."""
    if not hasattr(sock, "sendmsg"):  # Windows: one joined copy instead
        sock.sendall(b"".join(buffers))
        return
    views = [memoryview(b).cast("B") for b in buffers]
    while views:
        sent = sock.sendmsg(views)
        while views and sent >= views[0].nbytes:
            sent -= views[0].nbytes
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]


def read_http_head(sock: socket.socket, deadline: float | None, limit: int = 1 << 16) -> tuple[bytes, bytes]:
    """The opening handshake's HTTP head (through the blank line) and whatever arrived after it, which is already
    websocket frames: the head goes to websockets' handshake code, the rest to the `FrameStream`."""
    data = b""
    while (end := data.find(b"\r\n\r\n")) < 0:
        if len(data) > limit:
            raise ValueError(f"opening handshake over {limit} bytes")
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            raise TimeoutError("the opening handshake did not finish in time")
        sock.settimeout(left)
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("connection closed during the opening handshake")
        data += chunk
    return data[: end + 4], data[end + 4 :]
