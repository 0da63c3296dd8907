"""Shard downloads in a helper process, so that fetching takes no CPU and no thread hand-offs from the reader.

Why: a reader (a DataLoader worker, or each virtual reader's process) decodes windows on one thread under one
GIL. With the downloads on fetch threads of its own process, every shard cost the reader the clients' CPU
(urllib's or botocore's request and body handling, 1-3 ms) plus a wake-up and a GIL hand-off per step of each
download; with small shards, cold, it ran at 0.6-0.7x its local-disk rate while waiting for shards only 6% of
the time. Here the reader's process starts no threads: its streams write each download they want to one helper
process (`python -m vla_scale.data.fetch_process`) and read the answers when they next need a shard. The helper
runs `ShardCache.ensure` (room, eviction, `Location.fetch` with its retries, the rename) on a thread per download;
the reader pins the finished file (vla_scale/data/read_ahead.py). `data.storage.fetch_process: false` keeps the
downloads on threads of the reader's process instead.

Protocol, one JSON object per line. Reader to helper: `{"id", "root", "options", "rel", "ahead", "cache",
"limit"}`: put `root/rel` into the shard cache folder `cache` (limit in bytes; `ahead`: give up with "noroom"
rather than pass the limit). Helper to reader: `{"id", "done": <time.monotonic() when done>, "fetched": <false:
it was in the cache already>}` or `{"id", "error",
"kind": "noroom" | "unreachable" | "other"}`. The helper exits when its input closes (the reader is gone).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Collection
from dataclasses import asdict, dataclass
from typing import Any

from vla_scale.data.locations import FetchOptions, Location, Unreachable, open_location
from vla_scale.data.shard_cache import NoRoom, ShardCache

log = logging.getLogger(__name__)

# Environment the helper's clients read (credentials, endpoint, proxies): a change starts another helper.
_ENV_PREFIXES = ("AWS_", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy")


class FetchHelper:
    """The reader side, shared by the process's pools: requests are written at once; answers are read, without a
    thread, by whichever pool next looks for its own, and kept for their pool until it takes them."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(  # noqa: S603 - this interpreter, this module
            [sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._out = self.proc.stdout.fileno()
        self._buf = b""
        self.lock = threading.Lock()
        self.pending: set[int] = set()  # requests not answered yet
        self.answered: dict[int, dict[str, Any]] = {}  # answers read, not taken yet
        self.alive = True

    def start(self, location: Location, rel: str, ahead: bool, cache: ShardCache) -> int:
        """Ask for `rel` in `cache`; returns the request's id, which its answer carries."""
        msg = {"root": location.root, "options": asdict(location.options), "rel": rel, "ahead": ahead,
               "cache": str(cache.dir), "limit": cache.limit}  # fmt: skip
        with self.lock:
            n = msg["id"] = next(_IDS)
            self.pending.add(n)
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.write((json.dumps(msg) + "\n").encode())
                self.proc.stdin.flush()
            except (OSError, ValueError):  # the helper is gone
                self._gone()
        return n

    def wait(self, ids: Collection[int], timeout: float = 0.05) -> None:
        """Block until one of `ids` may have been answered, at most `timeout` seconds (another thread's pool may
        read the pipe first and keep the answer for this one)."""
        with self.lock:
            if not self.alive or b"\n" in self._buf or any(n in self.answered for n in ids):
                return
        select.select([self._out], [], [], timeout)

    def take(self, ids: Collection[int]) -> list[dict[str, Any]]:
        """The answers to those of `ids` that have arrived, without blocking (a "gone" error for each request still
        pending when the helper has exited)."""
        with self.lock:
            while self.alive and select.select([self._out], [], [], 0)[0]:
                chunk = os.read(self._out, 1 << 16)
                if not chunk:
                    self._gone()
                    break
                self._buf += chunk
            *lines, self._buf = self._buf.split(b"\n")
            for line in lines:  # after `_gone`: an answer that did arrive replaces the "gone" error
                msg = json.loads(line)
                self.pending.discard(msg["id"])
                self.answered[msg["id"]] = msg
            return [self.answered.pop(n) for n in list(ids) if n in self.answered]

    def _gone(self) -> None:
        """The helper has exited: every request still pending gets a "gone" error; call under `lock`."""
        self.alive = False
        with contextlib.suppress(subprocess.TimeoutExpired):  # its output closed as it exited: reap it for the status
            self.proc.wait(timeout=1.0)
        gone = f"the fetch process {self.proc.pid} has exited (status {self.proc.returncode})"
        self.answered.update({n: {"id": n, "error": gone, "kind": "gone"} for n in self.pending})
        self.pending.clear()

    def close(self) -> None:
        """End the helper (it exits when its input closes; downloads in progress are abandoned)."""
        with self.lock:
            self.alive = False
            if self.proc.stdin is not None:
                with contextlib.suppress(OSError):  # already gone: a failed write left bytes to flush
                    self.proc.stdin.close()
        self.proc.wait()


_IDS = itertools.count()  # request ids, unique across this process's helpers (a request may move to a new one)


@dataclass
class Request:
    """One download asked of a helper: what, and `tag`, the asker's own note of what it was for."""

    location: Location
    rel: str
    ahead: bool
    tag: Any
    resent: bool = False  # already sent again after a helper died with it


class Downloads:
    """A pool's requests to this process's helper, matched to their answers. A helper that dies is replaced and
    the requests it had are sent again to the new one, once (a second death on the same request is its error)."""

    def __init__(self, cache: ShardCache):
        self.cache = cache
        self.helper = fetch_helper()
        self.running: dict[int, tuple[Request, FetchHelper]] = {}

    def __len__(self) -> int:
        return len(self.running)

    def start(self, request: Request) -> None:
        if not self.helper.alive:  # ended (an idle one of an old environment, or killed): a new one
            self.helper = fetch_helper()
        n = self.helper.start(request.location, request.rel, request.ahead, self.cache)
        self.running[n] = (request, self.helper)

    def wait(self) -> None:
        """Block until an answer may have arrived (at most a moment: see `FetchHelper.wait`)."""
        if all(helper is self.helper for _, helper in self.running.values()):  # else an old one's are there
            self.helper.wait(self.running)

    def finished(self) -> list[tuple[Request, dict[str, Any]]]:
        """The requests answered since the last call, with their answers (no blocking)."""
        done = []
        for helper in {helper for _, helper in self.running.values()}:
            for msg in helper.take([n for n, (_, h) in self.running.items() if h is helper]):
                request, _ = self.running.pop(msg["id"])
                if msg.get("kind") == "gone" and not request.resent:
                    request.resent = True
                    log.warning("%s; fetching %s again in a new one", msg["error"], request.location.url(request.rel))
                    self.start(request)
                    continue
                done.append((request, msg))
        return done


def answer_error(msg: dict[str, Any], url: str) -> Exception:
    """The exception an error answer stands for, as `ShardCache.open` would have raised it in-process."""
    if msg["kind"] == "noroom":
        return NoRoom(msg["error"])
    if msg["kind"] in ("unreachable", "gone"):
        return Unreachable(msg["error"] if url in msg["error"] else f"cannot fetch {url}: {msg['error']}")
    return RuntimeError(f"fetching {url} in the fetch process: {msg['error']}")


def environment_key() -> tuple:
    """The environment a helper was started with, as far as its clients read it."""
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))


_HELPERS: dict[tuple, FetchHelper] = {}
_HELPERS_LOCK = threading.Lock()
# a forked child (a DataLoader worker) starts its own: the parent's pipes are not its own to read
os.register_at_fork(after_in_child=lambda: globals().update(_HELPERS={}, _HELPERS_LOCK=threading.Lock()))


def fetch_helper() -> FetchHelper:
    """This process's helper for the current credentials/endpoint/proxy environment (started on first use).

    Starting one for a changed environment ends the idle helpers of other environments (their pools start
    again with the current one's), so a process that changes endpoints does not collect helpers."""
    key = environment_key()
    with _HELPERS_LOCK:
        helper = _HELPERS.get(key)
        if helper is None or not helper.alive:
            for other, old in list(_HELPERS.items()):
                if not old.pending or not old.alive:
                    old.close()
                    del _HELPERS[other]
            helper = _HELPERS[key] = FetchHelper()
        return helper


def helper_pids() -> list[int]:
    """Process ids of this process's running fetch helpers (to measure their CPU, as the benchmark does)."""
    with _HELPERS_LOCK:
        return [h.proc.pid for h in _HELPERS.values() if h.alive]


def _serve() -> None:
    """The helper: one thread per download, each answer written whole under a lock; exits when its input closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is for the reader, which ends this by closing the pipe
    logging.basicConfig(format="fetch process: %(levelname)s %(message)s", level=logging.WARNING)
    out, out_lock = sys.stdout.buffer, threading.Lock()
    caches: dict[tuple, ShardCache] = {}
    locations: dict[tuple, Location] = {}

    def answer(msg: dict[str, Any]) -> None:
        with out_lock:
            out.write((json.dumps(msg) + "\n").encode())
            out.flush()

    def download(req: dict[str, Any], location: Location, cache: ShardCache) -> None:
        n = req["id"]
        try:
            fetched = cache.ensure(location, req["rel"], req["ahead"])
            answer({"id": n, "done": time.monotonic(), "fetched": fetched})
        except NoRoom as err:
            answer({"id": n, "error": str(err), "kind": "noroom"})
        except Unreachable as err:
            answer({"id": n, "error": str(err), "kind": "unreachable"})
        except Exception as err:  # noqa: BLE001 - reported to the reader, which raises it at that shard
            answer({"id": n, "error": f"{type(err).__name__}: {err}", "kind": "other"})

    for line in sys.stdin.buffer:
        req = json.loads(line)
        where = (req["root"], tuple(sorted(req["options"].items())))
        if where not in locations:  # one per dataset and settings: an S3 location keeps its client
            locations[where] = open_location(req["root"], FetchOptions(**req["options"]))
        folder = (req["cache"], req["limit"])
        if folder not in caches:  # one per folder: the room held for downloads in progress is counted once
            caches[folder] = ShardCache(*folder)
        threading.Thread(target=download, args=(req, locations[where], caches[folder]), daemon=True).start()
    os._exit(0)  # downloads still running are abandoned: the reader is gone


if __name__ == "__main__":
    _serve()
