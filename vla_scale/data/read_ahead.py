"""Read-ahead of remote shards: one pool of fetch threads per process, shared by every reader's stream.

Why: each reader (a source stream of a DataLoader worker, or of each virtual reader in elastic mode) needs its
next shards fetched before it gets there, but threads per stream would multiply with sources x virtual readers.
Here a stream's `ShardFetcher` only says which shards its reader will open, in order (across epochs: the next
epoch's order is known from the seed); the process's `FetchPool` threads (`data.storage.fetch_threads`), one
shard cache, fetch the next shard of whichever reader is closest to needing one, never more than that reader's
depth ahead of it. A reader's depth starts at `read_ahead` and grows, up to `read_ahead_max`, when its
shards take less time to read than to fetch (so more must be in flight): at each shard to the recent fetch time
over the recent read time, so it is planned from the first shard on, and each time the reader still had to wait
for a shard fetched ahead, by as many shards as it could have read in the time it waited; and never deeper than
the cache had room for (a read-ahead that found no room caps it). A fetch that failed is raised by `open` for
that shard, so the error reaches the reader at the shard it concerns.

Where the downloads run (`data.storage.fetch_process`): by default in the process's fetch helper
(vla_scale/data/fetch_process.py), and then the pool starts no threads: claims are sent to the helper as they
become possible, and its answers are collected by the reader when it opens or waits for a shard. Otherwise on
the pool's `fetch_threads` threads.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from vla_scale.config.schema_data import StorageConfig
from vla_scale.data.fetch_process import Downloads, Request, answer_error, environment_key
from vla_scale.data.locations import FetchOptions, Location, is_remote, open_location
from vla_scale.data.shard_cache import NoRoom, ShardCache, default_cache_dir

_HANDOFF_S = 0.002  # a shorter wait for a shard fetched ahead is the thread hand-off, not a fetch too slow


class FetchPool:
    """The process's fetches for one shard cache, serving every `ShardFetcher`, most urgent first, at most
    `threads` at a time: by the process's fetch helper (`helper`), or on threads of this process."""

    def __init__(self, cache: ShardCache, threads: int, helper: bool = False):
        self.cache = cache
        self.lock = threading.Lock()  # one lock orders all claims; each fetcher's reader waits on its own condition
        self.work = threading.Condition(self.lock)  # idle pool threads wait here, woken one per claimable shard
        self.fetchers: list[ShardFetcher] = []
        self.max_threads, self.threads = threads, 0
        self.downloads = Downloads(cache) if helper else None
        self.direct: dict[int, dict] = {}  # answers to `fetch_now` requests, by tag, until their caller takes them
        self._now = itertools.count()  # tags of `fetch_now` requests

    def register(self, fetcher: ShardFetcher) -> None:
        """Serve `fetcher` too; threads (without a helper) are started here and end when no fetcher is left."""
        with self.lock:
            self.fetchers.append(fetcher)
            if self.downloads is None:
                for _ in range(self.max_threads - self.threads):
                    threading.Thread(target=self._run, name="shard-fetch", daemon=True).start()
                self.threads = self.max_threads
            self.wake()

    def _pick(self) -> tuple[ShardFetcher, int, bool, int] | None:
        """(fetcher, position, is read-ahead, claim generation) of the claimable shard its reader needs soonest;
        call under `lock`."""
        best = self._soonest()
        if best is None:
            return None
        f, i = best
        f.next += 1
        f.claimed[i] = time.monotonic()
        return f, i, i > f.current, f.generation

    def _soonest(self) -> tuple[ShardFetcher, int] | None:
        """(fetcher, position) of the claimable shard its reader needs soonest, not claimed; call under `lock`."""
        best: tuple[int, ShardFetcher, int] | None = None
        for f in self.fetchers:
            i = f.next
            if (
                not f.paused
                and i < len(f.rels)
                and i <= f.current + f.depth
                and (best is None or i - f.current < best[0])
            ):
                best = (i - f.current, f, i)
        return None if best is None else (best[1], best[2])

    def wake(self) -> None:
        """A shard may have become claimable: send each claimable one to the helper, or wake one idle thread (it
        wakes the next if more are); call under `lock`. Why one: every thread woken for nothing costs two context
        switches and a GIL hand-off, and with small shards the reader paid for that herd in its throughput."""
        if self.downloads is None:
            self.work.notify()
            return
        while len(self.downloads) < self.max_threads and (job := self._pick()) is not None:
            f, i, ahead, generation = job
            self.downloads.start(Request(f.location, f.rels[i], ahead, (f, i, generation)))

    def collect(self, block: bool) -> None:
        """Deliver the helper's finished downloads (waiting for one first if `block`), pinned, to their fetchers;
        call under `lock` (released while blocked)."""
        assert self.downloads is not None
        if block:
            self.lock.release()
            try:
                self.downloads.wait()
            finally:
                self.lock.acquire()
        for request, msg in self.downloads.finished():
            if isinstance(request.tag, int):  # a `fetch_now`
                self.direct[request.tag] = msg
                continue
            f, i, generation = request.tag
            result: BinaryIO | Exception | None
            if "done" in msg:
                result = self.cache.pinned(request.location, request.rel)
                if result is None:  # evicted before it was pinned: ask again
                    self.downloads.start(request)
                    continue
            else:
                result = answer_error(msg, request.location.url(request.rel))
            f.deliver_locked(i, result, generation, msg.get("done"), msg.get("fetched", False))
        self.wake()

    def fetch_now(self, location: Location, rel: str) -> BinaryIO:
        """The shard `rel` cached and pinned, fetched now if it is not there (even past the cache's limit)."""
        if self.downloads is None:
            return self.cache.open(location, rel)
        with self.lock:
            while (f := self.cache.pinned(location, rel)) is None:
                tag = next(self._now)
                self.downloads.start(Request(location, rel, False, tag))
                while tag not in self.direct:
                    self.collect(block=True)
                if "done" not in (msg := self.direct.pop(tag)):
                    raise answer_error(msg, location.url(rel))
            return f

    def _run(self) -> None:
        while True:
            with self.lock:
                while (job := self._pick()) is None:
                    if not self.fetchers:
                        self.threads -= 1
                        self.work.notify()  # the next idle thread ends too
                        return
                    self.work.wait()
                if self._soonest() is not None:
                    self.work.notify()  # another shard is claimable: the next idle thread takes it
            f, i, ahead, generation = job
            result: BinaryIO | Exception
            fetched = False
            try:
                result, fetched = self.cache.open_fetched(f.location, f.rels[i], ahead)
            except Exception as err:  # noqa: BLE001 - handed to the reader at this shard
                result = err
            with f.cond:
                f.deliver_locked(i, result, generation, fetched=fetched)


class ShardFetcher:
    """One reader's shards in reading order, fetched ahead by the process's `FetchPool`.

    `open(url)` returns the pinned cached file of the next shard; up to `depth` shards beyond it are fetched
    and pinned meanwhile. `extend` appends the next epoch's shards while the current epoch is read, so an
    epoch's first shards are fetched ahead too instead of stalling the reader at every epoch boundary.
    """

    def __init__(self, pool: FetchPool, location: Location, urls: list[str], read_ahead: int, read_ahead_max: int):
        self.pool, self.location = pool, location
        self.cond = threading.Condition(pool.lock)  # this fetcher's reader waits here for its shards
        self.depth, self.max_depth = read_ahead, max(read_ahead, read_ahead_max) if read_ahead else 0
        self.urls: list[str] = []
        self.rels: list[str] = []
        self.current = -1  # the position being read
        self.next = 0  # the next position a pool thread claims
        self.generation = 0  # claims of an older generation were given back (`_give_back_ahead`): dropped
        self.paused = False  # no new claims while the reader fetches a shard read-ahead had no room for
        self.ready: dict[int, BinaryIO | Exception] = {}
        self.claimed: dict[int, float] = {}  # when a pool thread claimed each position still being fetched
        # recent time from claim to delivery of a shard, and the reader's time per shard (moving averages), from
        # where the process's earlier readers of this dataset left them: a new reader (each elastic virtual reader,
        # a resumed stream) plans its depth from its first shard on instead of waiting once to learn it
        self.fetch_s, self.read_s = _TIMINGS.get(location.root, (0.0, 0.0))
        if self.fetch_s and self.read_s and self.max_depth:
            self._deepen(math.ceil(self.fetch_s / self.read_s))
        self.closed = False
        self.wait_s = 0.0  # time `open` spent waiting for shards (the data wait this hides)
        self.opened = time.perf_counter()  # when `open` last returned
        self.extend(urls)
        pool.register(self)

    def extend(self, urls: list[str]) -> None:
        """Shards to read after those already given (the next epoch's), fetched ahead like the others."""
        rels = [self.location.rel(u) for u in urls]
        with self.cond:
            self.urls += urls
            self.rels += rels
            self.pool.wake()

    def deliver_locked(
        self, i: int, result: BinaryIO | Exception, generation: int, done: float | None = None, fetched: bool = True
    ) -> None:
        """The result for position `i`, there by `done` (time.monotonic(); None: now), unpinned at once if the
        reader is gone or past it, or the claim was given back meanwhile; call under `cond`. `fetched`: downloaded,
        not found in the cache (only downloads say how long fetching takes)."""
        claimed = self.claimed.pop(i, None)
        if claimed is not None and fetched and not isinstance(result, Exception):
            self.fetch_s = _average(self.fetch_s, (done or time.monotonic()) - claimed)
        if isinstance(result, NoRoom) and i > self.current:  # the cache holds no more ahead: plan no deeper
            self.max_depth = max(1, min(self.max_depth, i - self.current - 1))
            self.depth = min(self.depth, self.max_depth)
        if not self.closed and i >= self.current and generation == self.generation and i not in self.ready:
            self.ready[i] = result
            self.cond.notify()  # the reader (one per fetcher)
            return
        self._unpin(result)

    def fetched(self) -> set[int]:
        """Positions fetched and not read yet (the helper's finished downloads collected first)."""
        with self.cond:
            if self.pool.downloads is not None:
                self.pool.collect(block=False)
            return set(self.ready)

    def _give_back_ahead(self, i: int) -> None:
        """Unpin every shard fetched beyond `i` and let the pool claim them again later; call under `cond`.

        Why: read-ahead found no room for `i`, and the reader is about to fetch it anyway; shards beyond it that
        were pinned meanwhile (room freed after `i`'s attempt) would otherwise push the cache over its limit."""
        for j in [j for j in self.ready if j > i]:
            self._unpin(self.ready.pop(j))
        self.generation += 1  # results of claims beyond `i` still in flight are dropped on delivery
        self.next = i + 1
        self.paused = True  # until the reader holds `i`: shards pinned again meanwhile could not be evicted for it

    def open(self, url: str) -> BinaryIO:
        """The shard `url` (the next one in order), cached and pinned; raises `Unreachable` naming its URL."""
        start = time.perf_counter()
        reading = start - self.opened  # the time the reader took for the previous shard
        with self.cond:
            try:
                i = self.urls.index(url, self.current + 1)
            except ValueError:
                raise ValueError(f"{url} is not among the shards still to read") from None
            for skipped in range(self.current + 1, i):  # never opened (not expected): unpin what was fetched
                self._unpin(self.ready.pop(skipped, None))
            if self.pool.downloads is not None:
                self.pool.collect(block=False)  # downloads finished meanwhile: timings and free slots up to date
            in_flight = i not in self.ready and 0 < i < self.next  # fetched ahead, but not done yet
            if self.current >= 0 and self.max_depth:  # the previous shard was read: plan the depth from the timings
                self.read_s = _average(self.read_s, reading)
                self._deepen(math.ceil(self.fetch_s / max(self.read_s, 1e-3)))
                _TIMINGS[self.location.root] = (self.fetch_s, self.read_s)
            self.current, self.next = i, max(self.next, i)
            self.pool.wake()
            while i not in self.ready:
                if self.pool.downloads is None:
                    self.cond.wait()
                else:
                    self.pool.collect(block=True)
            result = self.ready.pop(i)
            if isinstance(result, NoRoom):
                self._give_back_ahead(i)
            waited = time.perf_counter() - start
            if in_flight and waited > _HANDOFF_S and not isinstance(result, NoRoom):
                # fetching takes longer than reading `depth` shards: keep as many more in flight as it waited shards
                self._deepen(self.depth + max(1, math.ceil(waited / max(reading, 1e-3))))
                self.pool.wake()
        self.wait_s += waited
        self.opened = time.perf_counter()
        if isinstance(result, NoRoom):  # read-ahead had no room: fetch it now, then let read-ahead go on
            try:
                return self.pool.fetch_now(self.location, self.rels[i])
            finally:
                with self.cond:
                    self.paused = False
                    self.pool.wake()
        if isinstance(result, Exception):
            raise result
        return result

    def _deepen(self, depth: int) -> None:
        """Keep `depth` shards in flight if that is more than now (never beyond `read_ahead_max`); under `cond`."""
        self.depth = max(self.depth, min(self.max_depth, depth))

    @staticmethod
    def _unpin(result: BinaryIO | Exception | None) -> None:
        if result is not None and not isinstance(result, Exception):
            result.close()

    def close(self) -> None:
        """Stop the read-ahead and unpin what it fetched but no one read."""
        with self.cond:
            self.closed = True
            if self in self.pool.fetchers:
                self.pool.fetchers.remove(self)
            self.pool.wake()  # idle pool threads end when no fetcher is left (each wakes the next)
            for result in self.ready.values():
                self._unpin(result)
            self.ready.clear()


def _average(mean: float, sample: float) -> float:
    """Moving average of recent timings (the first sample sets it): one slow or quick shard moves it halfway."""
    return sample if mean == 0.0 else 0.5 * (mean + sample)


_TIMINGS: dict[str, tuple[float, float]] = {}  # dataset root -> (fetch_s, read_s) of its last reader here
_POOLS: dict[tuple, FetchPool] = {}
_POOLS_LOCK = threading.Lock()
os.register_at_fork(after_in_child=lambda: globals().update(_POOLS={}, _POOLS_LOCK=threading.Lock()))  # no threads


def fetch_pool(storage: StorageConfig) -> FetchPool:
    """The process's pool (and shard cache) for this cache folder, limit and thread count."""
    folder = Path(storage.cache_dir or default_cache_dir()).resolve()
    helper = environment_key() if storage.fetch_process else None  # a pool per helper (credentials, endpoint)
    key = (str(folder), int(storage.cache_limit_gb * 1e9), storage.fetch_threads, helper)
    folder.mkdir(parents=True, exist_ok=True)  # again: the folder may have been deleted since the pool was made
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = _POOLS[key] = FetchPool(ShardCache(folder, key[1]), storage.fetch_threads, storage.fetch_process)
        return pool


def open_source(
    folder: str | Path, storage: StorageConfig | None
) -> tuple[Location, Callable[[list[str]], ShardFetcher] | None]:
    """A dataset's location, and for a remote one a factory of fetchers (None: read local files in place)."""
    storage = storage or StorageConfig()
    options = FetchOptions(retries=storage.retries, backoff_s=storage.backoff_s, timeout_s=storage.timeout_s)
    location = open_location(folder, options)
    if not is_remote(folder):
        return location, None
    pool = fetch_pool(storage)
    return location, lambda urls: ShardFetcher(pool, location, urls, storage.read_ahead, storage.read_ahead_max)
