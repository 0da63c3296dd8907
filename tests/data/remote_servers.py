"""Loopback servers for the remote-dataset tests and benchmark: a moto S3 server and a static HTTP server.

Both take the same fault injection (a `Faults` object, changeable while they run): N transient
HTTP 500s for a file, a connection dropped halfway through a file's body, a latency per request, a gate that
holds a request back until a condition holds.
Both bind port 0 on 127.0.0.1 and are shut down when their context exits.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

BUCKET = "vla-data"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass
class Faults:
    """What the servers do wrong; keys are file names (the last path component), e.g. 'shard-000001.tar'."""

    errors: Counter = field(default_factory=Counter)  # name -> how many more requests answer 500
    drops: Counter = field(default_factory=Counter)  # name -> how many more bodies are cut off halfway
    latency_s: float = 0.0  # added before every answer
    requests: Counter = field(default_factory=Counter)  # name -> requests seen (GET and HEAD)
    puts: list = field(default_factory=list)  # S3: object paths in the order their uploads completed
    gate: Callable[[str], None] | None = None  # called with the name before answering; may block to hold it back

    def decide(self, path: str) -> str:
        """'error', 'drop' or 'ok' for one request of `path` (and count it)."""
        name = path.rstrip("/").rsplit("/", 1)[-1].split("?", 1)[0]
        self.requests[name] += 1
        if self.latency_s:
            time.sleep(self.latency_s)
        if self.gate is not None:
            self.gate(name)
        if self.errors[name] > 0:
            self.errors[name] -= 1
            return "error"
        if self.drops[name] > 0:
            self.drops[name] -= 1
            return "drop"
        return "ok"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Faults` applied (no Range support: a resumed request gets the whole file again)."""

    faults: Faults

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
        pass

    def do_GET(self) -> None:
        what = self.faults.decide(self.path)
        if what == "error":
            self.send_error(500, "injected")
            return
        if what == "drop":
            f = self.send_head()
            if f is None:
                return
            with f:
                data = f.read()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)
            return
        super().do_GET()


@contextlib.contextmanager
def http_server(root: Path, faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """Serve `root` at http://127.0.0.1:<port>; yields (base URL, faults)."""
    faults = faults or Faults()
    handler = type("Handler", (_Handler,), {"faults": faults})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", faults
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _faulty_app(app, faults: Faults):  # noqa: ANN001, ANN202 - a WSGI middleware
    def wrapped(environ, start_response):  # noqa: ANN001, ANN202
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            result = app(environ, start_response)
            if environ.get("REQUEST_METHOD") == "PUT":
                faults.puts.append(environ.get("PATH_INFO", ""))
            return result
        what = faults.decide(environ.get("PATH_INFO", ""))
        if what == "error":
            start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
            return [b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"]
        if what == "drop":
            body = b"".join(app(environ, start_response))

            def cut() -> Iterator[bytes]:
                yield body[: len(body) // 2]
                raise ConnectionAbortedError("injected drop")

            return cut()
        return app(environ, start_response)

    return wrapped


@contextlib.contextmanager
def s3_server(faults: Faults | None = None) -> Iterator[tuple[str, Faults]]:
    """A moto S3 server with bucket `BUCKET`; sets AWS_ENDPOINT_URL and test credentials in os.environ meanwhile.

    Yields (endpoint URL, faults). The environment is restored on exit.
    """
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    faults = faults or Faults()

    class FaultyMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = _faulty_app(DomainDispatcherApplication(create_backend_app), faults)
            self._server = make_server(self._ip_address, self._port, app, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = FaultyMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        import boto3

        boto3.session.Session().client("s3").create_bucket(Bucket=BUCKET)
        yield endpoint, faults
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()
