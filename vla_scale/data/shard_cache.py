"""Streaming remote shards: a bounded local cache of whole shards with LRU eviction.

Shards are fetched (ahead of their reader: vla_scale/data/read_ahead.py) into a cache folder shared by every
reader on the node. The cache holds complete
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
from pathlib import Path
from typing import BinaryIO

from vla_scale.data.locations import Location, Unreachable

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
        return self.open_fetched(location, rel, ahead)[0]

    def open_fetched(self, location: Location, rel: str, ahead: bool = False) -> tuple[BinaryIO, bool]:
        """`open`, and whether the shard had to be fetched (False: it was in the cache)."""
        fetched = False
        while (f := self.pinned(location, rel)) is None:
            fetched = self.ensure(location, rel, ahead) or fetched
        return f, fetched

    def pinned(self, location: Location, rel: str) -> BinaryIO | None:
        """The cached shard `rel` opened and pinned, or None when it is not in the cache."""
        path = self.path_for(location.url(rel))
        f = _open_pinned(path)
        if f is not None:
            os.utime(path)  # most recently used
        return f

    def ensure(self, location: Location, rel: str, ahead: bool = False) -> bool:
        """Fetch `rel` into the cache unless it is there (not pinned: the reader pins it, possibly in another
        process, which fetches again if it was evicted meanwhile); `ahead` as for `open`. True if it was fetched."""
        path = self.path_for(location.url(rel))
        if path.exists():
            return False
        self._download(location, rel, path, ahead)
        return True

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
