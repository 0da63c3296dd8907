"""`vla-scale serve` as a real process: port 0 announced, SIGTERM/SIGINT answer the request in flight, refuse new
ones, close the connections and release the port."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed

from tests.serve.conftest import CHUNK, make_obs
from vla_scale.serve import PolicyClient, ServerError

START_TIMEOUT_S = 180  # imports and model load on a loaded 2-core machine


def read_url(proc: subprocess.Popen, timeout: float) -> str:
    """The ws:// address the server prints once it listens."""
    deadline = time.monotonic() + timeout
    seen = ""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            seen += line
            if match := re.search(r"on (ws://[\d.]+:\d+)", line):
                return match.group(1)
        if proc.poll() is not None:
            break
    raise AssertionError(f"the server did not announce its address: {seen!r}, exit {proc.poll()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_answers_in_flight_request_then_releases_the_port(export_dir, sig):
    cmd = [sys.executable, "-m", "vla_scale.cli", "serve", str(export_dir), "--port", "0", "--delay-ms", "1500"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        url = read_url(proc, START_TIMEOUT_S)
        port = int(url.rsplit(":", 1)[1])
        busy, late = PolicyClient(url, timeout=60), PolicyClient(url, timeout=60)
        result: dict = {}

        def infer() -> None:
            try:
                result["chunk"] = busy.infer(make_obs(np.random.default_rng(0)))
            except Exception as err:  # noqa: BLE001 - reported below
                result["error"] = err

        worker = threading.Thread(target=infer)
        worker.start()
        time.sleep(0.5)  # the request is on the model (1.5 s)
        proc.send_signal(sig)
        time.sleep(0.3)
        with pytest.raises(ServerError, match="shutting down"):
            late.infer(make_obs(np.random.default_rng(1)))
        worker.join(timeout=60)
        assert "error" not in result and result["chunk"].shape == (CHUNK, 4)  # the in-flight request was answered
        assert proc.wait(timeout=60) == 0
        with pytest.raises(ConnectionClosed):
            busy.health()  # the connections were closed
        out = proc.stdout.read()
        assert "policy server stopped" in out and "Traceback" not in out, out
        # neither client reads its socket now, so neither answers the closing handshake: the server drops them
        # after CLOSE_TIMEOUT_S (1 s) instead of websockets' default 10 s (the process's own exit is not timed:
        # under load it took over 8 s once)
        closed_s = float(re.search(r"connections closed in ([\d.]+) s", out).group(1))
        assert 0.5 < closed_s < 5.0, out
        with socket.socket() as s:  # a new server can listen on the port (SO_REUSEADDR, as asyncio's servers set it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
            s.listen()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_a_second_signal_exits_without_waiting_for_a_stuck_inference(export_dir):
    cmd = [sys.executable, "-m", "vla_scale.cli", "serve", str(export_dir), "--port", "0", "--delay-ms", "60000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        client = PolicyClient(read_url(proc, START_TIMEOUT_S), timeout=120)
        result: dict = {}

        def infer() -> None:
            try:
                client.infer(make_obs(np.random.default_rng(0)))
            except ConnectionClosed as err:  # the server exits without answering
                result["error"] = err

        worker = threading.Thread(target=infer, daemon=True)
        worker.start()
        time.sleep(0.5)  # the request is on the model (60 s)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert proc.poll() is None  # the first signal waits for the request (up to the 30 s grace)
        start = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 1 and time.monotonic() - start < 20
        assert "second signal, exiting now" in proc.stdout.read()
        worker.join(timeout=30)
        assert isinstance(result.get("error"), ConnectionClosed)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def test_serve_refuses_a_folder_that_is_no_export(tmp_path):
    from vla_scale.cli import main as cli

    assert cli(["serve", str(tmp_path), "--port", "0"]) == 2
