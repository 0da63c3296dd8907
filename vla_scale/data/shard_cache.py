"""Streaming remote shards: a bounded local cache with LRU eviction, and per-reader read-ahead.

Each reader fetches the shard it is about to read, plus the next `read_ahead` ones in as many
background threads, into a cache folder shared by every reader on the node. The cache holds complete
shards only (a download goes to a `.part` file renamed when complete, deleted by the next cache user if its
process was killed); its size (`.part` files and
the room held for downloads in progress included) is kept under `limit_bytes` by deleting the least
recently used shards first. The room a download holds is known only within its process, so readers
in several processes sharing one folder can pass the limit briefly, by at most the downloads they
have in flight. A shard being read, or fetched ahead and not yet read, is held open with a shared
`flock`; eviction takes an exclusive non-blocking lock first, so it never deletes a shard some
reader holds. Read-ahead that would need more room than eviction can free is dropped (the reader
fetches that shard when it gets there); a shard the reader needs now is always fetched, and only
then may pinned shards leave the cache briefly over its limit.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vla_scale.config.schema_data import StorageConfig
from vla_scale.data.locations import FetchOptions, Location, Unreachable, is_remote, open_location

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """`$VLA_SCALE_CACHE_DIR`, else ~/.cache/vla_scale/shards."""
    env = os.environ.get("VLA_SCALE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "vla_scale" / "shards"


class NoRoom(Exception):
    """Read-ahead would push the cache over its limit (every other shard in it is in use)."""


class ShardCache:
    """A folder of fetched shards, at most `limit_bytes` in total, evicted least recently used first."""

    def __init__(self, directory: str | Path, limit_bytes: int):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.limit = int(limit_bytes)
        self._lock = threading.RLock()
        self._reserved = 0  # bytes promised to this process's downloads in progress
        for entry in os.scandir(self.dir):  # downloads a killed process left behind would count as used forever
            _remove_if_stale(entry.path)

    def path_for(self, url: str) -> Path:
        name = url.rstrip("/").rsplit("/", 1)[-1][-60:]
        return self.dir / f"{hashlib.sha1(url.encode()).hexdigest()[:16]}-{name}"

    def used_bytes(self) -> int:
        """Bytes of every file in the cache folder (complete shards and downloads in progress)."""
        total = 0
        for entry in os.scandir(self.dir):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def reserve(self, need: int, force: bool) -> bool:
        """Make room for a download of `need` bytes and hold it until `release`; False (nothing held) when it does
        not fit, unless `force` (a shard the reader needs now: held anyway, the cache briefly over its limit)."""
        with self._lock:  # one decision at a time: two threads must not both take the last room
            fits = self.make_room(need)
            if fits or force:
                self._reserved += need
        return fits

    def release(self, size: int) -> None:
        with self._lock:
            self._reserved -= size

    def make_room(self, need: int) -> bool:
        """Delete unpinned shards, least recently used first, until `need` more bytes fit; False if they cannot."""
        with self._lock:
            need += self._reserved
            entries = []
            for entry in os.scandir(self.dir):
                try:
                    st = entry.stat()
                except FileNotFoundError:
                    continue
                if not _remove_if_stale(entry.path):
                    entries.append((st.st_mtime, entry.path, st.st_size))
            used = sum(size for _, _, size in entries)
            for _, path, size in sorted(entries):
                if used + need <= self.limit:
                    break
                if not path.endswith(".part") and _evict(path):
                    used -= size
            return used + need <= self.limit

    def open(self, location: Location, rel: str, ahead: bool = False) -> BinaryIO:
        """The cached shard `rel` opened for reading and pinned (shared lock) until closed; fetched if missing.

        `ahead`: a read-ahead fetch, abandoned with `NoRoom` rather than exceed the limit.
        """
        url = location.url(rel)
        path = self.path_for(url)
        while True:
            f = _open_pinned(path)
            if f is not None:
                os.utime(path)  # most recently used
                return f
            self._download(location, rel, path, ahead)

    def _download(self, location: Location, rel: str, path: Path, ahead: bool) -> None:
        part = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")

        held = []

        def on_size(size: int, fetched: bool = False) -> None:
            """Hold room for the download (`fetched`: it is complete, its .part file already counts as used)."""
            if size > self.limit:
                raise Unreachable(
                    f"{location.url(rel)} is {size} bytes, more than data.storage.cache_limit_gb allows "
                    f"({self.limit} bytes); raise the limit"
                )
            if held:  # a retry: the room is still held
                return
            need = 0 if fetched else size
            fits = self.reserve(need, force=not ahead)
            if not fits and ahead:
                raise NoRoom(location.url(rel))
            held.append(need)
            if not fits:
                log.warning("shard cache %s over its limit while fetching %s (shards in use fill it)", self.dir, rel)

        try:
            with open(part, "wb") as f:
                fcntl.flock(f, fcntl.LOCK_EX)  # in use (a process in another pid namespace may look dead)
                location.fetch(rel, f, on_size)
            if not held:  # size unknown up front (pipe:, HTTP without Content-Length): make room before it counts
                on_size(part.stat().st_size, fetched=True)
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)
            for size in held:
                self.release(size)


def _open_pinned(path: Path) -> BinaryIO | None:
    """`path` opened with a shared lock, or None when it is not (or no longer) in the cache."""
    try:
        f = open(path, "rb")  # noqa: SIM115 - returned open, pinned until the reader closes it
    except FileNotFoundError:
        return None
    fcntl.flock(f, fcntl.LOCK_SH)
    try:
        same = os.fstat(f.fileno()).st_ino == os.stat(path).st_ino  # not evicted between open and lock
    except FileNotFoundError:
        same = False
    if not same:
        f.close()
        return None
    return f


def _remove_if_stale(path: str) -> bool:
    """Delete a download's `.part` file whose process (the pid in its name) is gone and holds no lock on it."""
    if not path.endswith(".part"):
        return False
    try:
        pid = int(path.rsplit(".", 3)[-3])
        os.kill(pid, 0)
        return False  # alive (or reused: the file waits until that process ends)
    except ProcessLookupError:
        return _evict(path)
    except (ValueError, IndexError, PermissionError):  # not our name, or another user's live process
        return False


def _evict(path: str) -> bool:
    """Delete a cached shard unless a reader holds it."""
    try:
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
            os.unlink(path)
            return True
    except FileNotFoundError:
        return False


class ShardFetcher:
    """One reader's shards in reading order, across epochs, fetched ahead by `read_ahead` background threads.

    `open(url)` returns the pinned cached file of the next shard; the threads keep up to `read_ahead`
    shards beyond the one being read fetched (in parallel: with high latency or a per-connection bandwidth
    cap, one connection at a time would not keep up) and pinned. `extend` appends the next epoch's shards
    (their order is known from the seed) while the current epoch is read, so an epoch's first shards are
    fetched ahead too instead of stalling the reader at every epoch boundary. A fetch that failed in a
    thread is raised by `open` for that shard, so the error reaches the reader at the shard it concerns.
    """

    def __init__(self, location: Location, cache: ShardCache, urls: list[str], read_ahead: int):
        self.location, self.cache, self.read_ahead = location, cache, read_ahead
        self.urls: list[str] = []
        self.rels: list[str] = []
        self.current = -1  # the position being read
        self.ready: dict[int, BinaryIO | Exception] = {}
        self.cond = threading.Condition()
        self.closed = False
        self.wait_s = 0.0  # time `open` spent waiting for shards (the data wait this hides)
        self.next = 0  # the next position a thread claims
        self.extend(urls)
        for _ in range(max(1, read_ahead)):
            threading.Thread(target=self._run, name="shard-read-ahead", daemon=True).start()

    def extend(self, urls: list[str]) -> None:
        """Shards to read after those already given (the next epoch's), fetched ahead like the others."""
        rels = [self.location.rel(u) for u in urls]
        with self.cond:
            self.urls += urls
            self.rels += rels
            self.cond.notify_all()

    def _claim(self) -> tuple[int, bool] | None:
        """(the next position to fetch, whether it is read-ahead) once it is within reach; None when closed."""
        with self.cond:
            while not self.closed and self.next >= len(self.rels):
                self.cond.wait()
            i = self.next
            self.next += 1
            while not self.closed and i > self.current + self.read_ahead:
                self.cond.wait()
            return None if self.closed else (i, i > self.current)

    def _run(self) -> None:
        while (claim := self._claim()) is not None:
            i, ahead = claim
            try:
                result: BinaryIO | Exception = self.cache.open(self.location, self.rels[i], ahead=ahead)
            except Exception as err:  # noqa: BLE001 - handed to the reader at this shard
                result = err
            with self.cond:
                if self.closed or i < self.current:  # closed, or passed over by the reader: unpin
                    if not isinstance(result, Exception):
                        result.close()
                    if self.closed:
                        return
                    continue
                self.ready[i] = result
                self.cond.notify_all()

    def open(self, url: str) -> BinaryIO:
        """The shard `url` (the next one in order), cached and pinned; raises `Unreachable` naming its URL."""
        start = time.perf_counter()
        with self.cond:
            try:
                i = self.urls.index(url, self.current + 1)
            except ValueError:
                raise ValueError(f"{url} is not among the shards still to read") from None
            for skipped in range(self.current + 1, i):  # never opened (not expected): unpin what was fetched
                result = self.ready.pop(skipped, None)
                if result is not None and not isinstance(result, Exception):
                    result.close()
            self.current = i
            self.cond.notify_all()
            while i not in self.ready:
                self.cond.wait()
            result = self.ready.pop(i)
        self.wait_s += time.perf_counter() - start
        if isinstance(result, NoRoom):
            return self.cache.open(self.location, self.rels[i])  # read-ahead had no room: fetch it now
        if isinstance(result, Exception):
            raise result
        return result

    def close(self) -> None:
        """Stop the read-ahead and unpin what it fetched but no one read."""
        with self.cond:
            self.closed = True
            self.cond.notify_all()
            for result in self.ready.values():
                if not isinstance(result, Exception):
                    result.close()
            self.ready.clear()


def open_source(
    folder: str | Path, storage: StorageConfig | None
) -> tuple[Location, Callable[[list[str]], ShardFetcher] | None]:
    """A dataset's location, and for a remote one a factory of per-epoch fetchers (None: read local files in place)."""
    storage = storage or StorageConfig()
    options = FetchOptions(retries=storage.retries, backoff_s=storage.backoff_s, timeout_s=storage.timeout_s)
    location = open_location(folder, options)
    if not is_remote(folder):
        return location, None
    cache = ShardCache(storage.cache_dir or default_cache_dir(), int(storage.cache_limit_gb * 1e9))
    return location, lambda urls: ShardFetcher(location, cache, urls, storage.read_ahead)
