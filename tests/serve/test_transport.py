"""vla_scale/serve/transport.py against websockets' own (threaded) server: framing the policy server never uses but a
peer may (fragments, pings, text), timeouts that leave the connection usable, and both closing handshakes."""

from __future__ import annotations

import threading

import pytest
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK
from websockets.sync.server import ServerConnection, serve

from vla_scale.serve.transport import Connection

BIG = 300_000  # larger than one socket read


@pytest.fixture
def peer():
    """A websockets server running `peer.handler` for each connection; what it saw goes into `peer.seen`."""

    class Peer:
        handler = None
        seen: dict = {}

    def run(ws: ServerConnection) -> None:
        Peer.handler(ws)

    with serve(run, "127.0.0.1", 0, max_size=None) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        Peer.url = f"ws://127.0.0.1:{server.socket.getsockname()[1]}"
        yield Peer
        server.shutdown()
    thread.join(timeout=10)


def test_fragments_pings_and_a_timeout_then_the_server_closes(peer):
    def handler(ws: ServerConnection) -> None:
        assert ws.recv() == b"go"
        pong = ws.ping()
        ws.send([b"a" * BIG, b"b" * BIG])  # one binary message in two frames
        ws.send(["frag", "mented"])  # one text message in two frames
        peer.seen["pong"] = pong.wait(10)  # the client answered while reading the messages
        ws.recv()  # "late": sent after the client's timeout
        ws.send(b"late reply")
        ws.close()

    peer.handler = handler
    conn = Connection(peer.url, open_timeout=10, max_size=None)
    conn.send(b"go")
    assert conn.recv(10) == b"a" * BIG + b"b" * BIG
    assert conn.recv(10) == "fragmented"
    with pytest.raises(TimeoutError):
        conn.recv(0.2)  # nothing was sent yet
    conn.send("late")
    assert conn.recv(10) == b"late reply"  # the connection survived the timeout
    with pytest.raises(ConnectionClosedOK):
        conn.recv(10)
    with pytest.raises(ConnectionClosed):
        conn.send(b"after close")
    assert peer.seen["pong"]
    conn.close()


def test_client_close_is_a_clean_closing_handshake(peer):
    def handler(ws: ServerConnection) -> None:
        try:
            ws.recv()
        except ConnectionClosedOK:
            peer.seen["code"] = ws.close_code

    peer.handler = handler
    conn = Connection(peer.url, open_timeout=10)
    conn.close()
    for _ in range(100):
        if "code" in peer.seen:
            break
        threading.Event().wait(0.05)
    assert peer.seen.get("code") == 1000


def test_no_server_is_a_clear_error():
    from tests.train.jobs import free_port

    with pytest.raises(OSError):
        Connection(f"ws://127.0.0.1:{free_port()}", open_timeout=5)
    with pytest.raises(ValueError, match="wss://"):
        Connection("wss://127.0.0.1:1")
