"""Warm rank processes for `run_ranks`: a Python process that has already imported what a training rank
imports (torch, transformers, DeepSpeed, vla_scale, wandb: 8-10 CPU-seconds per rank) forks one rank per job.

Why: a 2-rank test job spends most of its time importing, twice; the integration tier starts about twenty
such jobs. One server per rank slot (rank index, world size, environment) pays the imports once a session.

What a forked rank shares with `python -m vla_scale.train.main` in a fresh interpreter:
- the environment at import time: the server of rank slot `r` is started with rank `r`'s environment
  (RANK, LOCAL_RANK, WORLD_SIZE, OMP_NUM_THREADS, DS_ACCELERATOR, ...); only MASTER_PORT is per job, set
  in the child before any process group exists, as are the working directory and sys.argv;
- its own session (SIGKILL of the process group reaches its DataLoader workers), its own log file as
  stdout and stderr, /dev/null as stdin, and a normal interpreter exit (atexit handlers, thread joins);
- different hash seeds on different ranks (each rank slot has its own server interpreter), so rank-divergent
  set/dict iteration orders still show up across ranks.
What differs: a rank slot keeps its hash seed and import-time state from job to job. Tests of the launchers
themselves (launchers/train.sh, torchrun.sh, several nodes) never go through here.

The server never starts threads before it forks (it refuses to serve if an import started one), reaps its
children and reports each exit code; when its stdin closes (pytest ended, or was killed) it SIGKILLs the
process groups of every rank still running and exits. Protocol: JSON lines, requests on stdin, events on
the original stdout (anything the imports print goes to stderr).
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import queue
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# What `python -m vla_scale.train.main` imports before and while it sets up a run (vla_scale.train.main
# itself is left to runpy, which warns about a module that is already imported).
PRELOAD = (
    "vla_scale.train.loop",
    "deepspeed",
    "transformers.models.llava.modeling_llava",  # the debug config's family, and its tiny parts:
    "transformers.models.llama.modeling_llama",
    "transformers.models.siglip.modeling_siglip",
    "peft",
    "wandb",
    "wandb.sdk.launch",  # wandb.init imports it (and the public API's pydantic models)
)
START_TIMEOUT_S = 300.0  # the server's imports, on a loaded 2-core machine
DISABLE_ENV = "VLA_TEST_RANK_SERVER"  # "0": every rank is a fresh interpreter (`python -m ...`) again


# ----- server side (python -m tests.train.rank_server) ------------------------------------------------------


def _serve() -> dict | None:
    """Import, then fork one rank per request until stdin closes. Returns the request in a forked child
    (which then runs the rank), None in the server once it is done."""
    events = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # whatever the imports print goes to stderr, not into the event channel

    def send(**event) -> None:
        events.write(json.dumps(event) + "\n")
        events.flush()

    for name in PRELOAD:
        importlib.import_module(name)
    # as every rank's engine does first (DeepSpeed's Muon module, imported at initialize and at the first backward)
    importlib.import_module("vla_scale.compat").import_muon_with_lazy_kernels()
    if threading.active_count() != 1:
        send(error=f"the imports started threads; forking would be unsafe: {threading.enumerate()}")
        return None
    send(ready=os.getpid())
    server, children, pending = os.getpid(), set(), b""
    try:
        while True:
            readable, _, _ = select.select([0], [], [], 0.1)
            if readable:
                chunk = os.read(0, 1 << 16)
                if not chunk:
                    return None  # the client is gone
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    job = json.loads(line)
                    sync_r, sync_w = os.pipe()
                    pid = os.fork()
                    if pid == 0:  # the rank: a session of its own, then leave the server loop
                        os.close(sync_r)
                        os.setsid()
                        os.close(sync_w)
                        events.close()
                        return job
                    os.close(sync_w)
                    os.read(sync_r, 1)  # EOF once the child has its own session: killpg reaches it from now on
                    os.close(sync_r)
                    children.add(pid)
                    send(started=pid)
            while children:
                pid, status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
                children.discard(pid)
                send(exited=pid, code=os.waitstatus_to_exitcode(status))
    finally:
        if os.getpid() == server:
            for pid in children:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for pid in children:
                os.waitpid(pid, 0)


def _run_rank(job: dict) -> None:
    """In the forked child: become `python -m <module> <argv>` started in `cwd` with `env` and `log` as output."""
    import runpy

    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.chdir(job["cwd"])
    os.environ.clear()
    os.environ.update(job["env"])
    sys.path[0] = job["cwd"]  # what `python -m` puts first
    sys.argv = [job["module"], *job["argv"]]
    runpy.run_module(job["module"], run_name="__main__", alter_sys=True)


def main() -> None:
    job = _serve()
    if job is None:
        sys.stderr.flush()
        os._exit(0)  # the server: nothing to clean up (its ranks are reaped), and tearing down torch takes seconds
    _run_rank(job)  # returns, or raises SystemExit, at the top level: a normal interpreter exit


# ----- client side (used by tests/train/jobs.py) -----------------------------------------------------------


class RankServerError(RuntimeError):
    pass


class ForkedRank:
    """A rank forked by a RankServer, with the part of subprocess.Popen that jobs.py uses."""

    def __init__(self, server: RankServer, pid: int):
        self.server, self.pid, self.returncode = server, pid, None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_code(self.pid)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"rank {self.pid}", timeout)
            time.sleep(0.05)
        return self.returncode


class RankServer:
    """One server process (see the module docstring); `start` forks a rank from it."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        fd, name = tempfile.mkstemp(prefix="rank_server-", suffix=".log")
        os.close(fd)
        self.stderr = Path(name)
        with self.stderr.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.train.rank_server"],
                cwd=ROOT,
                env=env,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                start_new_session=True,
            )
        self.events: queue.Queue = queue.Queue()
        self.exits: dict[int, int] = {}
        self.lock = threading.Lock()
        self.ready = False
        threading.Thread(target=self._read, daemon=True).start()

    def wait_ready(self) -> None:
        """Block until the server has imported everything (servers of one job import side by side)."""
        if not self.ready:
            event = self._next_event(START_TIMEOUT_S)
            if "ready" not in event:
                raise RankServerError(f"rank server did not start: {event}\n{self.stderr_tail()}")
            self.ready = True

    def _read(self) -> None:
        for line in self.proc.stdout:
            event = json.loads(line)
            if "exited" in event:
                with self.lock:
                    self.exits[event["exited"]] = event["code"]
            else:
                self.events.put(event)
        self.events.put({"error": "the rank server exited"})

    def _next_event(self, timeout: float) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            return {"error": f"no answer in {timeout:.0f}s"}

    def stderr_tail(self) -> str:
        return self.stderr.read_text(errors="replace")[-4000:]

    def start(self, module: str, argv: list[str], env: dict[str, str], cwd: Path, log: Path) -> ForkedRank:
        job = {"module": module, "argv": argv, "env": env, "cwd": str(cwd), "log": str(log)}
        try:
            self.proc.stdin.write((json.dumps(job) + "\n").encode())
            self.proc.stdin.flush()
        except BrokenPipeError as err:
            raise RankServerError(f"the rank server is gone\n{self.stderr_tail()}") from err
        event = self._next_event(60)
        if "started" not in event:
            raise RankServerError(f"the rank server did not start a rank: {event}\n{self.stderr_tail()}")
        return ForkedRank(self, event["started"])

    def exit_code(self, pid: int) -> int | None:
        """The rank's exit code once the server reaped it; if the server died first, 255 once the rank is gone."""
        with self.lock:
            if pid in self.exits:
                return self.exits[pid]
        if self.proc.poll() is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return 255
        return None

    def close(self) -> None:
        """Close the server's stdin (it kills any rank still running and exits); SIGKILL it if it lingers."""
        try:
            if not self.proc.stdin.closed:
                self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=30)
        self.stderr.unlink(missing_ok=True)


# Environment variables that differ from job to job but that nothing the servers preload reads at import time: a
# server is shared by jobs whose environments differ only in these (the child still gets the job's own values).
# Besides the port and pytest's test name: S3 credentials and endpoint (boto3 reads them when a client is made),
# MuJoCo's and PyOpenGL's backend (set in the pytest process by the in-process eval tests; neither is preloaded)
# and the compiled-ops folder (read when an op is loaded). Each of these used to start two more servers
# (~6 s of CPU each) on the worker that met it first.
PER_JOB_ENV = ("MASTER_PORT", "PYTEST_CURRENT_TEST", "MUJOCO_GL", "PYOPENGL_PLATFORM", "TORCH_EXTENSIONS_DIR")
PER_JOB_ENV_PREFIXES = ("AWS_",)
MAX_SERVERS = 4  # the least recently used beyond this are closed (each holds torch & co. in memory)
# Jobs of more ranks start fresh interpreters: the suite has one such job (elastic 2 -> 1 -> 4), whose servers
# (a preload costs more CPU than a fresh rank's own imports) would serve it once and evict the 2-rank ones.
MAX_WARM_RANKS = 2
_servers: dict[tuple, RankServer] = {}  # in order of last use
_failed: list[str] = []


def servers_for(envs: list[dict[str, str]]) -> list[RankServer] | None:
    """One ready server per rank, for ranks started with these environments (PER_JOB_ENV aside; a server
    starts on first use); None where ranks must be fresh interpreters: DISABLE_ENV=0, a GPU (CUDA does not
    survive a fork), a server that failed to start (warned about once), or more than MAX_WARM_RANKS ranks."""
    if os.environ.get(DISABLE_ENV) == "0" or _failed or len(envs) > MAX_WARM_RANKS:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    servers = []
    for env in envs:
        base = {k: v for k, v in env.items() if k not in PER_JOB_ENV and not k.startswith(PER_JOB_ENV_PREFIXES)}
        key = tuple(sorted(base.items()))
        server = _servers.pop(key, None) or RankServer(base)
        _servers[key] = server  # (re)inserted last: most recently used
        servers.append(server)
    while len(_servers) > max(MAX_SERVERS, len(servers)):
        _servers.pop(next(iter(_servers))).close()
    try:
        for server in servers:
            server.wait_ready()
    except RankServerError as err:
        _failed.append(str(err))
        warnings.warn(f"ranks start as fresh interpreters from now on: {err}", stacklevel=2)
        return None
    return servers


@atexit.register
def _close_all() -> None:
    for server in _servers.values():  # every server sees EOF at once and exits side by side
        try:
            server.proc.stdin.close()
        except OSError:
            pass
    for server in _servers.values():
        server.close()


if __name__ == "__main__":
    main()
