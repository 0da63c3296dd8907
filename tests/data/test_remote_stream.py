"""Datasets streamed from a loopback HTTP server, a moto S3 server and a pipe: command, against the local copy."""

import io
import itertools
import os
import shutil
import subprocess
import threading
import time

import numpy as np
import pytest

from data_tools.upload import upload
from tests.data.remote_servers import BUCKET, http_server, s3_server
from tests.data.toy_shards import write_robot, write_vl
from vla_scale.config.errors import ConfigError
from vla_scale.config.schema import Config, DataConfig, SourceConfig
from vla_scale.config.schema_data import StorageConfig
from vla_scale.data.format import FormatError, Manifest
from vla_scale.data.locations import FetchOptions, PipeLocation, Unreachable
from vla_scale.data.read_ahead import fetch_pool, open_source
from vla_scale.data.reader import BadSamples, DataError, Reader
from vla_scale.data.shard_cache import ShardCache
from vla_scale.data.stream import SourceStream
from vla_scale.train.prepare import check_datasets

LENGTHS = [5, 6, 4, 7, 5, 6, 5, 4]  # 4 shards of 2 episodes


@pytest.fixture(scope="module")
def robot(tmp_path_factory):
    return write_robot(tmp_path_factory.mktemp("remote") / "robot", LENGTHS, per_shard=2)


def storage(tmp_path, **kw) -> StorageConfig:
    return StorageConfig(cache_dir=str(tmp_path / "cache"), **{"backoff_s": 0.01, "read_ahead": 2, **kw})


def stream(path, tmp_path=None, policy="skip", reader=None, **kw) -> SourceStream:
    st = storage(tmp_path, **kw) if tmp_path is not None else None
    return SourceStream(path, reader or Reader(), 0, 4, True, 2, 2, BadSamples(policy), storage=st)


def items(s: SourceStream, n: int = 60) -> list:
    """The first `n` items of the endless shuffled stream (several epochs of this small dataset)."""
    return list(itertools.islice(iter(s), n))


def assert_same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.key == y.key
        for name in ("images", "state", "action", "action_mask"):
            np.testing.assert_array_equal(getattr(x, name), getattr(y, name), err_msg=f"{x.key} {name}")


def test_http_stream_equals_local_for_every_reader(robot, tmp_path):
    with http_server(robot.parent) as (base, faults):
        for reader in (Reader(), Reader(rank=1, world_size=2), Reader(rank=2, world_size=3, worker=1, num_workers=2)):
            assert_same(items(stream(f"{base}/robot", tmp_path, reader=reader)), items(stream(robot, reader=reader)))
        assert faults.requests["shard-000000.tar"] >= 1


def test_s3_upload_then_stream_equals_local(robot, tmp_path):
    with s3_server():
        upload(robot, f"s3://{BUCKET}/ds/robot")
        url = f"s3://{BUCKET}/ds/robot"
        assert Manifest.load(url).num_samples == len(LENGTHS)
        assert_same(items(stream(url, tmp_path)), items(stream(robot)))


def test_pipe_location_equals_local(robot, tmp_path):
    assert_same(items(stream(f"pipe:cat {robot}/{{}}", tmp_path)), items(stream(robot)))
    with pytest.raises(FormatError, match=r"needs \{\}"):
        stream(f"pipe:cat {robot}/shard.tar", tmp_path)


@pytest.mark.parametrize("server", ["http", "s3"])
def test_transient_errors_and_dropped_connections_are_retried(robot, tmp_path, server):
    local = items(stream(robot), 30)
    if server == "http":
        with http_server(robot.parent) as (base, faults):
            faults.errors["shard-000001.tar"] = 2
            faults.drops["shard-000002.tar"] = 1
            got = items(stream(f"{base}/robot", tmp_path), 30)
    else:
        with s3_server() as (_, faults):
            upload(robot, f"s3://{BUCKET}/robot")
            faults.errors["shard-000001.tar"] = 2
            faults.drops["shard-000002.tar"] = 1
            got = items(stream(f"s3://{BUCKET}/robot", tmp_path), 30)
    assert_same(got, local)
    assert faults.errors["shard-000001.tar"] == 0 and faults.drops["shard-000002.tar"] == 0  # the faults happened
    assert faults.requests["shard-000001.tar"] >= 3 and faults.requests["shard-000002.tar"] >= 2


def test_missing_shard_names_the_url_or_is_counted_under_skip(robot, tmp_path):
    served = tmp_path / "served"
    shutil.copytree(robot, served / "robot")
    (served / "robot" / "shard-000002.tar").unlink()
    with http_server(served) as (base, faults):
        url = f"{base}/robot/shard-000002.tar"
        with pytest.raises(DataError, match=rf"{url} does not exist"):
            list(stream(f"{base}/robot", tmp_path, policy="fail")._epoch_items())
        skip = stream(f"{base}/robot", tmp_path / "2")
        keys = {w.key.split("/")[0] for w in skip._epoch_items()}
        assert keys == {f"ep{i:04d}" for i in range(len(LENGTHS))} - {"ep0004", "ep0005"}
        assert skip.bad.counts["toy_robot"] == 2  # both episodes the manifest lists for the missing shard
        shutil.copy(robot / "shard-000002.tar", served / "robot")
        faults.errors["shard-000003.tar"] = 10  # stays failing: the retries give up and name the URL
        with pytest.raises(DataError, match=r"shard-000003.tar: still failing after 3 attempts"):
            list(stream(f"{base}/robot", tmp_path / "3", policy="fail", retries=2)._epoch_items())


def test_prepare_checks_the_manifest_at_the_url_before_any_rank(robot, tmp_path):
    with http_server(robot.parent) as (base, faults):
        with pytest.raises(FormatError, match=rf"{base}/nothing/manifest.json not found"):
            Manifest.load(f"{base}/nothing")
        cfg = Config(data=DataConfig(sources=[SourceConfig(f"{base}/nothing")]))
        with pytest.raises(ConfigError, match=rf"data.sources.0.path: {base}/nothing/manifest.json not found"):
            check_datasets(cfg)
        faults.errors["manifest.json"] = 2  # transient: retried
        cfg = Config(data=DataConfig(sources=[SourceConfig(f"{base}/robot")]))
        assert check_datasets(cfg)[0].num_samples == len(LENGTHS)
        assert faults.requests["manifest.json"] == 2 + 3  # two for the missing dataset, then 2 failures + 1


def test_cache_stays_under_its_limit_and_evicts_least_recently_used(robot, tmp_path):
    sizes = sorted(p.stat().st_size for p in robot.glob("shard-*.tar"))
    limit = sizes[-1] + sizes[-2] + sizes[-3]  # room for the shard being read and two ahead, not all four
    before = set(threading.enumerate())
    with http_server(robot.parent) as (base, faults):
        s = stream(f"{base}/robot", tmp_path, cache_limit_gb=limit / 1e9, read_ahead=2)
        cache = ShardCache(tmp_path / "cache", limit)
        seen, it = [], iter(s)
        for item in itertools.islice(it, 80):  # ~3 epochs
            assert cache.used_bytes() <= limit
            seen.append(item)
        it.close()  # ends the read-ahead; the fetches still in flight finish (in the fetch process) meanwhile
        for t in set(threading.enumerate()) - before:
            if t.name == "shard-fetch":
                t.join(timeout=30)
        deadline = time.monotonic() + 30
        while any(p.name.endswith(".part") for p in (tmp_path / "cache").iterdir()) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert_same(seen, items(stream(robot), 80))
        assert sum(faults.requests.values()) > 4 + 1  # shards were evicted and fetched again in later epochs
    assert cache.used_bytes() <= limit
    assert len(list((tmp_path / "cache").iterdir())) <= 3


def test_read_ahead_runs_on_into_the_next_epoch(robot, tmp_path):
    with http_server(robot.parent) as (base, _):
        s = stream(f"{base}/robot", tmp_path, read_ahead=2, read_ahead_max=2)
        first = len(list(s._epoch_entries(fetch_next_epoch=True)))  # epoch 0 read to its end
        fetcher = s._fetcher
        assert fetcher is not None and not fetcher.closed  # kept for epoch 1
        n0 = len(s.manifest.shards)
        deadline = time.monotonic() + 20
        while not {n0, n0 + 1} <= fetcher.fetched() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {n0, n0 + 1} <= fetcher.fetched()  # epoch 1's first two shards fetched before it starts
        assert n0 + 2 not in fetcher.fetched()  # and no further than read_ahead
        s.epoch = 1
        local = stream(robot)
        local.epoch = 1
        assert [e.key for e in s._epoch_entries()] == [e.key.replace(str(robot), f"{base}/robot")
                                                       for e in local._epoch_entries()]  # fmt: skip
        assert first > 0 and s._fetcher is None and fetcher.closed  # a one-epoch read closes it


def test_read_ahead_deepens_while_fetching_is_slower_than_reading(robot, tmp_path):
    with http_server(robot.parent) as (base, faults):
        s = stream(f"{base}/robot", tmp_path, read_ahead=1, read_ahead_max=2)

        def slower_than_reading(name: str) -> None:
            """Answer a shard only once the reader waits for it (a timed latency races a loaded machine's reader)."""
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                f = s._fetcher
                if name.endswith(".tar") and f is not None and f.current >= 0 and f.rels[f.current].endswith(name):
                    break
                if not name.endswith(".tar"):
                    return
                time.sleep(0.005)
            time.sleep(0.05)  # the reader is waiting: keep it waiting longer than a thread hand-off

        faults.gate = slower_than_reading
        it = iter(s)
        assert_same([next(it) for _ in range(20)], items(stream(robot), 20))
        assert s._fetcher is not None and s._fetcher.depth == 2  # grown (to its maximum, no further)
        it.close()


def test_read_ahead_depth_is_planned_from_fetch_and_read_times_before_any_wait(robot, tmp_path):
    """Shards fetched in 0.5 s and read in ~0.05 s need ~10 in flight: after one shard read the depth is raised
    from the timings, without first making the reader wait for a shard fetched ahead."""
    with http_server(robot.parent) as (base, faults):
        faults.latency_s = 0.5
        location, fetchers = open_source(f"{base}/robot", storage(tmp_path, read_ahead=2, read_ahead_max=6))
        urls = [location.url(s.name) for s in sorted(robot.glob("shard-*.tar"))]
        fetcher = fetchers(urls)
        try:
            fetcher.open(urls[0]).close()  # fetched with shard 1 (read-ahead 2), both ~0.5 s
            time.sleep(0.05)  # "reading" shard 0
            waited = fetcher.wait_s
            fetcher.open(urls[1]).close()  # arrived meanwhile: no wait to react to
            assert fetcher.wait_s - waited < 0.1
            assert fetcher.depth >= 3  # planned: 0.5 s of fetching over ~0.05 s of reading (capped at 6)
        finally:
            fetcher.close()


def test_a_new_reader_starts_from_the_last_readers_timings_and_cache_hits_do_not_count(robot, tmp_path):
    with http_server(robot.parent) as (base, faults):
        faults.latency_s = 0.3
        location, fetchers = open_source(f"{base}/robot", storage(tmp_path, read_ahead=1, read_ahead_max=6))
        urls = [location.url(s.name) for s in sorted(robot.glob("shard-*.tar"))]
        first = fetchers(urls)
        try:
            first.open(urls[0]).close()
            time.sleep(0.03)  # "reading" shard 0
            first.open(urls[1]).close()  # its depth is planned from ~0.3 s of fetching over ~0.03 s of reading
            assert first.depth >= 3 and first.fetch_s >= 0.25
        finally:
            first.close()
        second = fetchers(urls)  # a new reader of the same dataset in this process
        try:
            assert second.depth >= 3 and second.fetch_s == first.fetch_s  # deep from its first shard on
            second.open(urls[0]).close()  # in the cache: no download, so no fetch time
            assert second.fetch_s == first.fetch_s
        finally:
            second.close()


@pytest.mark.parametrize("fetch_process", [True, False], ids=["fetch-process", "threads"])
def test_readers_of_a_process_share_one_pool_of_fetches(robot, tmp_path, fetch_process):
    """Elastic mode runs many virtual readers per worker: their streams must not each start fetch threads, nor
    have more than `fetch_threads` downloads running at a time."""
    before = {t for t in threading.enumerate() if t.name == "shard-fetch"}
    readers = [Reader(rank=v, world_size=3) for v in range(3)]
    with http_server(robot.parent) as (base, _):
        remote = [
            iter(stream(f"{base}/robot", tmp_path, reader=r, fetch_threads=2, fetch_process=fetch_process))
            for r in readers
        ]
        pool = fetch_pool(storage(tmp_path, fetch_threads=2, fetch_process=fetch_process))
        got, most = [], 0
        for _ in range(30):  # round-robin, as virtual readers are drawn
            got.append([next(it) for it in remote])
            most = max(most, len(pool.downloads or ()))
    started = {t for t in threading.enumerate() if t.name == "shard-fetch"} - before
    assert len(started) == (0 if fetch_process else 2)
    assert most <= 2
    for v, r in enumerate(readers):
        assert_same([row[v] for row in got], items(stream(robot, reader=r), 30))
    for it in remote:
        it.close()
    for t in started:
        t.join(timeout=10)
        assert not t.is_alive()  # no reader left: the pool's threads end


@pytest.mark.parametrize("fetch_process", [True, False], ids=["fetch-process", "threads"])
def test_downloads_run_in_the_fetch_process_unless_configured_otherwise(robot, tmp_path, fetch_process):
    log = tmp_path / "fetched-by.log"  # each file fetched, and the pid of the process that ran its pipe command
    s = stream(f"pipe:echo {{}} $PPID >> {log}; cat {robot}/{{}}", tmp_path, fetch_process=fetch_process)
    assert_same(items(s, 30), items(stream(robot), 30))
    by = {line.split()[1] for line in log.read_text().splitlines() if line.startswith("shard-")}
    assert by and "manifest.json" in log.read_text()  # the manifest is read in-process, before any shard
    if fetch_process:
        assert by == {str(fetch_pool(storage(tmp_path)).downloads.helper.proc.pid)} and str(os.getpid()) not in by
    else:
        assert by == {str(os.getpid())}


def test_a_killed_fetch_process_is_replaced_and_its_downloads_asked_again(robot, tmp_path):
    release = threading.Event()
    with http_server(robot.parent) as (base, faults):
        faults.gate = lambda name: release.wait(30) if name == "shard-000001.tar" else None
        location, fetchers = open_source(f"{base}/robot", storage(tmp_path, read_ahead=2))
        urls = [location.url(p.name) for p in sorted(robot.glob("shard-*.tar"))]
        fetcher = fetchers(urls)
        pool = fetch_pool(storage(tmp_path, read_ahead=2))
        try:
            fetcher.open(urls[0]).close()
            killed = pool.downloads.helper.proc
            killed.kill()  # while it fetches shard 1 (held back by the server) and shard 2
            killed.wait()
            release.set()
            for url in urls[1:]:
                with fetcher.open(url) as f:
                    assert f.read() == (robot / url.rsplit("/", 1)[-1]).read_bytes()
            assert pool.downloads.helper.proc.pid != killed.pid and pool.downloads.helper.alive
        finally:
            release.set()
            fetcher.close()


def test_a_shard_that_kills_the_fetch_process_twice_is_an_error_naming_it(robot, tmp_path):
    command = f"pipe:case {{}} in shard-000002.tar) kill -9 $PPID;; esac; cat {robot}/{{}}"
    s = stream(command, tmp_path, "fail", read_ahead=0)  # no other shard in flight when it dies (it too is resent once)
    with pytest.raises(DataError, match=r"shard-000002.tar: the fetch process \d+ has exited \(status -9\)"):
        items(s, 60)


def test_warm_cache_is_not_fetched_again(robot, tmp_path):
    with http_server(robot.parent) as (base, faults):
        list(stream(f"{base}/robot", tmp_path)._epoch_items())
        before = sum(faults.requests.values())
        list(stream(f"{base}/robot", tmp_path)._epoch_items())
        assert sum(faults.requests.values()) == before + 2  # only manifest.json and stats.json again


def test_storage_config_is_validated():
    cfg = DataConfig(sources=[SourceConfig("s3://b/ds")])
    cfg.validate()
    for key, value, msg in [
        ("cache_limit_gb", 0.0, "data.storage.cache_limit_gb must be > 0"),
        ("read_ahead", -1, "data.storage.read_ahead must be >= 0"),
        ("read_ahead_max", -1, "data.storage.read_ahead_max must be >= 0"),
        ("fetch_threads", 0, "data.storage.fetch_threads must be >= 1"),
        ("retries", -2, "data.storage.retries must be >= 0"),
        ("timeout_s", 0.0, "data.storage.timeout_s must be > 0"),
    ]:
        bad = DataConfig(sources=[SourceConfig("s3://b/ds")], storage=StorageConfig(**{key: value}))
        with pytest.raises(ConfigError, match=msg):
            bad.validate()


def test_vl_dataset_over_http(tmp_path):
    vl = write_vl(tmp_path / "vl", 6, per_shard=2)
    with http_server(tmp_path) as (base, _):
        remote = list(stream(f"{base}/vl", tmp_path)._epoch_items())
    local = list(stream(vl)._epoch_items())
    assert [v.conversations for v in remote] == [v.conversations for v in local]


def complete_bytes(folder) -> int:
    """Bytes of the complete shards in a cache folder (not .part downloads; one evicted meanwhile counts 0)."""
    total = 0
    for entry in os.scandir(folder):
        if not entry.name.endswith(".part"):
            try:
                total += entry.stat().st_size
            except FileNotFoundError:
                pass
    return total


def test_cache_limit_holds_for_pipe_locations_whose_size_is_unknown_up_front(robot, tmp_path):
    sizes = sorted(p.stat().st_size for p in robot.glob("shard-*.tar"))
    limit = sizes[-1] + sizes[-2] + sizes[-3]  # room for the shard being read and two ahead, not all four
    log = tmp_path / "fetched.log"
    s = stream(f"pipe:echo {{}} >> {log}; cat {robot}/{{}}", tmp_path, cache_limit_gb=limit / 1e9, read_ahead=2)
    seen = []
    for item in itertools.islice(iter(s), 80):  # ~3 epochs
        assert complete_bytes(tmp_path / "cache") <= limit
        seen.append(item)
    assert_same(seen, items(stream(robot), 80))
    assert len(log.read_text().split()) > 4  # shards were evicted and fetched again in later epochs


def test_part_files_of_killed_downloads_are_deleted_not_counted_forever(tmp_path):
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    (cache_dir / f"abc-shard-000000.tar.{dead.pid}.1.part").write_bytes(b"x" * 1000)  # SIGKILLed mid-download
    live = cache_dir / f"abc-shard-000001.tar.{os.getpid()}.1.part"
    live.write_bytes(b"y" * 100)  # a download in progress
    cache = ShardCache(cache_dir, 2000)
    assert cache.used_bytes() == 100 and live.is_file()
    (cache_dir / f"abc-shard-000002.tar.{dead.pid}.2.part").write_bytes(b"z" * 1000)  # killed while the cache is open
    assert cache.make_room(1900) and cache.used_bytes() == 100


def _running(pid: int) -> bool:
    try:
        return "State:\tZ" not in open(f"/proc/{pid}/status").read()  # a zombie has ended
    except FileNotFoundError:
        return False


def test_hung_pipe_command_is_killed_after_timeout_and_retried(robot, tmp_path):
    pids = tmp_path / "pids"
    hung = PipeLocation(
        f"pipe:sleep 60 & echo $! >> {pids}; printf {{}}; wait", FetchOptions(retries=1, backoff_s=0.01, timeout_s=0.5)
    )
    start = time.monotonic()
    with pytest.raises(Unreachable, match=r"still failing after 2 attempts \(command hung: no output for 0.5 s"):
        hung.fetch("shard-000000.tar", io.BytesIO())
    assert time.monotonic() - start < 10
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2
    deadline = time.monotonic() + 5
    while any(map(_running, started)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map(_running, started))  # the whole process group was killed, not only the shell
    slow = PipeLocation(f"pipe:for i in 1 2 3 4; do sleep 0.2; cat {robot}/{{}}; done", FetchOptions(timeout_s=0.5))
    out = io.BytesIO()  # slower in total than timeout_s, but never silent that long: not a hang
    assert slow.fetch("shard-000000.tar", out) == 4 * (robot / "shard-000000.tar").stat().st_size


def test_the_loader_starts_every_remote_sources_first_shards_before_drawing(robot, tmp_path, tokenizer):
    """The mixer draws from a source only when a batch needs it; its first shard must already be on the way."""
    from vla_scale.data.loader import MixedBatches, StreamSpec

    vl = write_vl(tmp_path / "vl", 6, per_shard=3)
    spec = StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=2)
    with http_server(robot.parent) as (robot_base, robot_faults), http_server(vl.parent) as (vl_base, vl_faults):
        sources = [SourceConfig(f"{robot_base}/robot", 1.0), SourceConfig(f"{vl_base}/vl", 1.0)]
        cfg = DataConfig(sources=sources, num_workers=0, storage=storage(tmp_path, read_ahead=1))
        streams = MixedBatches(cfg, spec, tokenizer)._streams(Reader(), BadSamples("raise"), set())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(0 in s._fetcher.fetched() for s in streams):
            time.sleep(0.01)
        assert all(0 in s._fetcher.fetched() for s in streams)  # fetched before any item was asked for
        first_shards = [s._fetcher.rels[0] for s in streams]
        firsts = [next(iter(s)) for s in streams]
        counts = [faults.requests[name] for faults, name in zip((robot_faults, vl_faults), first_shards, strict=True)]
        assert counts == [1, 1]  # the shards fetched at the start were the ones read: no second request
    local = DataConfig(sources=[SourceConfig(str(robot), 1.0), SourceConfig(str(vl), 1.0)], num_workers=0)
    local_streams = MixedBatches(local, spec, tokenizer)._streams(Reader(), BadSamples("raise"), set())
    assert [f.key.rsplit("/", 1)[-1] for f in firsts] == [next(iter(s)).key.rsplit("/", 1)[-1] for s in local_streams]


def test_a_fetch_started_for_one_epoch_is_replaced_when_another_is_read(robot, tmp_path):
    with http_server(robot.parent) as (base, _):
        s = stream(f"{base}/robot", tmp_path)
        s.start_fetching()  # for epoch 0
        s.epoch = 1  # as a resume that starts in a later epoch would
        local = stream(robot)
        local.epoch = 1
        assert [e.key for e in s._epoch_entries()] == [e.key.replace(str(robot), f"{base}/robot")
                                                       for e in local._epoch_entries()]  # fmt: skip
