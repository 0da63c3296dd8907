"""`FrameStream` (vla_scale/serve/frames.py) against websockets' own frame code and clients: every length class both
ways, masking, fragments with a ping between them, a timeout in the middle of a frame, each protocol violation
closed with its RFC 6455 code, the closing handshake; then the policy server with websockets' threaded client."""

from __future__ import annotations

import socket
import struct
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, ConnectionClosedOK, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import connect

from tests.serve.conftest import make_obs
from vla_scale.serve import PolicyClient
from vla_scale.serve import protocol as proto
from vla_scale.serve.frames import BUFFER_BYTES, FrameStream
from vla_scale.serve.server import load_server


@pytest.fixture
def pair():
    """(client end, server end, raw client socket, raw server socket) over a socketpair, handshake skipped."""
    a, b = socket.socketpair()
    client, server = FrameStream(a, client=True, max_size=None), FrameStream(b, client=False, max_size=None)
    yield client, server, a, b
    a.close(), b.close()


def wire(opcode: Opcode, data: bytes, fin: bool = True, mask: bool = True) -> bytes:
    """A frame as websockets itself writes it (the reference the stream must read)."""
    return Frame(opcode, data, fin).serialize(mask=mask)


def sent_in_thread(fn, *args) -> threading.Thread:  # noqa: ANN001
    """Large messages fill the socket buffer: send them while the other end reads."""
    thread = threading.Thread(target=fn, args=args, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 300_001, BUFFER_BYTES + 12345])
def test_every_length_class_both_ways(pair, size):
    client, server, _, _ = pair
    payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    thread = sent_in_thread(client.send, payload)
    assert server.recv(time.monotonic() + 30) == payload
    thread.join(30)
    thread = sent_in_thread(server.send, payload)
    assert client.recv(time.monotonic() + 30) == payload
    thread.join(30)
    text = "pousse le bloc bleu, s'il te plaît " * (size // 40 + 1)
    client.send(text[:200])
    assert server.recv(time.monotonic() + 30) == text[:200]


def test_client_frames_are_masked_and_server_frames_are_not(pair):
    client, server, a, b = pair
    client.send(b"observation")
    raw = b.recv(100)
    assert raw[0] == 0x82 and raw[1] == 0x80 | 11 and b"observation" not in raw  # masked with a random key
    server.send(b"actions")
    assert a.recv(100) == bytes([0x82, 7]) + b"actions"


def test_fragments_with_a_ping_between_them_and_a_timeout_mid_frame(pair):
    _, server, a, _ = pair
    a.sendall(wire(Opcode.BINARY, b"ab", fin=False) + wire(Opcode.PING, b"p") + wire(Opcode.CONT, b"cd"))
    assert server.recv(time.monotonic() + 10) == b"abcd"
    assert a.recv(100) == bytes([0x8A, 1]) + b"p"  # the pong, unmasked, same payload
    frame = wire(Opcode.BINARY, b"x" * 1000)
    a.sendall(frame[:500])
    with pytest.raises(TimeoutError):
        server.recv(time.monotonic() + 0.2)
    a.sendall(frame[500:])
    assert server.recv(time.monotonic() + 10) == b"x" * 1000  # the half frame was kept


def close_code(sock: socket.socket) -> int:
    """The code of the close frame the other end sent (unmasked, from the server end)."""
    data = b""
    sock.settimeout(10)
    while len(data) < 4 and (chunk := sock.recv(100)):
        data += chunk
    assert data[0] == 0x88, data
    return struct.unpack("!H", data[2:4])[0]


VIOLATIONS = [
    ("unmasked client frame", wire(Opcode.BINARY, b"abc", mask=False), 1002),
    ("reserved bit", bytes([0x80 | 0x40 | 0x2]) + wire(Opcode.BINARY, b"abc")[1:], 1002),
    ("unknown opcode", bytes([0x83]) + wire(Opcode.BINARY, b"abc")[1:], 1002),
    ("continuation without a message", wire(Opcode.CONT, b"abc"), 1002),
    ("new message inside a fragmented one", wire(Opcode.BINARY, b"a", fin=False) + wire(Opcode.TEXT, b"b"), 1002),
    ("control frame over 125 bytes", bytes([0x89, 0x80 | 126]) + struct.pack("!H", 126) + b"\0" * 130, 1002),
    ("fragmented control frame", bytes([0x09]) + wire(Opcode.PING, b"p")[1:], 1002),
    ("text that is not UTF-8", wire(Opcode.TEXT, b"\xff\xfe"), 1007),
    ("message over max_size", wire(Opcode.BINARY, b"\0" * 2000), 1009),
]


@pytest.mark.parametrize("case", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_protocol_violations_close_with_their_code(case):
    _, frame, code = case
    a, b = socket.socketpair()
    server = FrameStream(b, client=False, max_size=1000)
    a.sendall(frame)
    a.shutdown(socket.SHUT_WR)  # the server drains what follows a violation until EOF
    with pytest.raises(ConnectionClosedError) as closed:
        server.recv(time.monotonic() + 10)
    assert closed.value.sent is not None and closed.value.sent.code == code
    assert close_code(a) == code
    a.close()


def test_an_absurd_length_is_refused_even_without_a_size_limit(pair):
    _, server, a, _ = pair  # max_size=None
    a.sendall(bytes([0x82, 0x80 | 127]) + (1 << 40).to_bytes(8, "big") + b"mask")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(ConnectionClosedError):
        server.recv(time.monotonic() + 10)
    assert close_code(a) == 1009


def test_closing_handshake_from_the_client(pair):
    client, server, _, _ = pair
    result: dict = {}

    def serve() -> None:
        try:
            server.recv(time.monotonic() + 10)
        except ConnectionClosed as err:
            result["closed"] = err

    thread = sent_in_thread(serve)
    start = time.monotonic()
    client.close(timeout=5)
    thread.join(10)
    assert time.monotonic() - start < 2  # the server answered; nobody waited for the timeout
    assert isinstance(result["closed"], ConnectionClosedOK) and result["closed"].rcvd.code == 1000
    with pytest.raises(ConnectionClosedOK):
        server.send(b"too late")


# ----- the policy server with websockets' own client -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(export_dir, one_thread):
    with load_server(export_dir, port=0) as srv:
        yield srv


def test_websockets_client_fragments_pings_and_closes(server):
    with PolicyClient(server.url, timeout=30) as probe:
        before = probe.health()["connections"]
        with connect(server.url, compression=None, max_size=None) as ws:
            assert proto.unpack(ws.recv(timeout=30))["type"] == "metadata"
            request = proto.pack({"type": "infer", "obs": make_obs(np.random.default_rng(0)), "id": 7})
            ws.send([request[:1000], request[1000:]])  # one message in two frames
            reply = proto.unpack(ws.recv(timeout=30))
            assert reply["type"] == "actions" and reply["id"] == 7
            assert ws.ping().wait(10)  # the server answers pings between requests
            assert probe.health()["connections"] == before + 1
        deadline = time.monotonic() + 10  # the clean close ended that connection on the server
        while probe.health()["connections"] != before:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_a_plain_http_request_is_refused_and_the_server_keeps_serving(server):
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 426"), answer  # Upgrade Required, from websockets' handshake code
    with PolicyClient(server.url, timeout=30) as client:
        assert client.health()["status"] == "ok"


def test_an_unmasked_frame_closes_only_that_connection(server):
    with PolicyClient(server.url, timeout=30) as bad, PolicyClient(server.url, timeout=30) as good:
        bad._ws._stream.sock.sendall(wire(Opcode.BINARY, proto.pack({"type": "health"}), mask=False))
        with pytest.raises(ConnectionClosed) as closed:
            bad._ws.recv(10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1002
        assert good.health()["status"] == "ok"


def test_connections_over_the_limit_are_refused_with_503(export_dir, one_thread):
    with load_server(export_dir, port=0, max_connections=1) as srv, PolicyClient(srv.url, timeout=30) as first:
        with pytest.raises(InvalidStatus) as refused:
            PolicyClient(srv.url, timeout=30)
        assert refused.value.response.status_code == 503
        assert b"limit of 1 connections" in refused.value.response.body
        assert first.health()["connections"] == 1
        first.close()
        deadline = time.monotonic() + 10  # the slot is free once the server saw the close
        while True:
            try:
                with PolicyClient(srv.url, timeout=30) as second:
                    assert second.health()["status"] == "ok"
                break
            except InvalidStatus:
                assert time.monotonic() < deadline
                time.sleep(0.05)
