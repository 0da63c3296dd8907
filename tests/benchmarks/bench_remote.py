"""Windows/s from a loopback S3 server and a loopback HTTP server vs local disk (a script; pytest does not collect it).

Why: datasets at scale are streamed from object storage; with read-ahead the next shards are fetched while the
current one is decoded, so per-request latency should cost (almost) nothing. This reads the same synthetic
robot shards through `SourceStream` (windows decoded and normalised, as the training loader does) from:
local disk; HTTP (http.server) and S3 (moto server) with `--latency-ms` added to every request, with an empty
cache holding half the dataset (cold: as a dataset larger than the cache, most shards are fetched in every epoch)
and a cache filled beforehand (warm), with read-ahead and without (read_ahead=0). Both servers run
in a child process on 127.0.0.1 (so they do not share the reader's GIL); bandwidth is loopback, so only the
latency and the CPU cost of fetching are measured.

Built for a shared, loaded machine, where local disk alone varies 2-3x between runs: every remote pass is paired
with a local one taken just before or after it (alternating), in `--rounds` interleaved rounds (local, HTTP,
local, S3, ...), so each ratio compares two passes seconds apart. A pass reads `--epochs` epochs;
its rate counts from the first window on (the time to that window, stream start-up and the first shard's fetch
included, is reported apart). Reported per configuration: the median windows/s over the rounds,
the median of the per-round ratios to local (and their range), the share of time the reader waited on a shard,
and CPU ms per window (all threads of the reading process: the overhead of fetching that load does not hide),
and the servers' CPU per window (on a real deployment they run elsewhere; here they take cores from the reader).

    python tests/benchmarks/bench_remote.py                   # 50 ms per request, 9 rounds
    python tests/benchmarks/bench_remote.py --latency-ms 0 --per-shard 16
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_tools.synth import synth  # noqa: E402
from data_tools.upload import upload  # noqa: E402
from tests.benchmarks.bench_common import command_line, median, table  # noqa: E402
from tests.data.remote_servers import BUCKET, S3_ENV, Faults, http_server, s3_server  # noqa: E402
from vla_scale.config.schema_data import StorageConfig  # noqa: E402
from vla_scale.data.fetch_process import helper_pids  # noqa: E402
from vla_scale.data.reader import BadSamples, Reader  # noqa: E402
from vla_scale.data.stream import SourceStream  # noqa: E402


@dataclass
class Pass:
    """One measured read of `n` windows."""

    rate: float  # windows/s after the first window
    first_s: float  # constructing the stream (manifest.json, stats.json) and reading its first window
    wait_frac: float  # share of the time after the first window spent blocked on a shard not yet fetched
    cpu_ms: float  # process CPU time per window after the first (every thread)
    helper_ms: float  # CPU time of the reader's fetch process per window (data.storage.fetch_process)
    server_ms: float  # CPU time of the servers' process per window (on this machine it competes with the reader)


SERVER_PID = 0  # the servers' child process


def cpu_s(pid: int) -> float:
    """CPU seconds process `pid` has used (utime + stime from /proc; 0 when not running or not Linux)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    path: str, cache: Path | None, read_ahead: int, n: int, limit_gb: float = 20.0, fetch_process: bool = True
) -> Pass:
    """Read `n` windows of the endless stream (shuffle buffer, decode, normalise) as one training reader does."""
    storage = (
        StorageConfig(cache_dir=str(cache), read_ahead=read_ahead, cache_limit_gb=limit_gb, fetch_process=fetch_process)
        if cache
        else None
    )
    start = time.perf_counter()
    stream = SourceStream(path, Reader(), 0, 16, True, 2, 4, BadSamples("fail"), storage=storage)
    fetchers = []
    if stream.opener is not None:  # keep the fetchers to read the time `open` blocked on a shard
        make = stream.opener

        def opener(urls: list[str]):  # noqa: ANN202
            fetchers.append(make(urls))
            return fetchers[-1]

        stream.opener = opener
    items = iter(stream)
    next(items)
    helpers = helper_pids()

    def helpers_cpu_s() -> float:
        return sum(cpu_s(pid) for pid in helpers)

    waited0, cpu0, server0 = sum(f.wait_s for f in fetchers), time.process_time(), cpu_s(SERVER_PID)
    helper0 = helpers_cpu_s()
    t0 = time.perf_counter()
    count = sum(1 for _ in itertools.islice(items, n - 1))
    wall, cpu, server = time.perf_counter() - t0, time.process_time() - cpu0, cpu_s(SERVER_PID) - server0
    helper = helpers_cpu_s() - helper0
    items.close()  # ends the read-ahead
    waited = sum(f.wait_s for f in fetchers) - waited0
    return Pass(count / wall, t0 - start, waited / wall, cpu / count * 1e3, helper / count * 1e3, server / count * 1e3)


def serve(root: str, latency_s: float, names: list[str], ready, stop) -> None:  # noqa: ANN001 - multiprocessing
    """Child process: the HTTP server over `root` and a moto S3 server holding each dataset `root/<name>` at
    s3://BUCKET/<name>; `latency_s` is added to every request once the uploads are done."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    faults = Faults()
    with http_server(Path(root), faults) as (http, _), s3_server(faults) as (endpoint, _):
        for name in names:
            upload(Path(root) / name, f"s3://{BUCKET}/{name}")
        faults.latency_s = latency_s  # the upload is not measured
        ready.put((http, endpoint))
        stop.wait()


@dataclass
class Config:
    """One remote configuration and what its rounds measured (each with the local pass taken just before it)."""

    name: str
    url: str
    read_ahead: int
    warm: bool
    fetch_process: bool = True  # False: downloads on the reader's own threads (data.storage.fetch_process)
    passes: list[Pass] = field(default_factory=list)
    local: list[Pass] = field(default_factory=list)


def run_rounds(configs: list[Config], local: str, tmp: Path, rounds: int, n: int, cold_limit_gb: float) -> None:
    """Each remote pass paired with a local one; which of the two goes first alternates between rounds."""
    for c in configs:
        if c.warm:
            # fill the cache (not measured)
            measure(c.url, tmp / f"cache-{c.name}", c.read_ahead, n, fetch_process=c.fetch_process)
    for r in range(rounds):
        for c in configs:
            cache = tmp / (f"cache-{c.name}" if c.warm else f"cold-{r}")
            for which in ("local", "remote") if r % 2 == 0 else ("remote", "local"):
                if which == "local":
                    c.local.append(measure(local, None, 0, n))
                else:
                    limit = 20.0 if c.warm else cold_limit_gb
                    c.passes.append(measure(c.url, cache, c.read_ahead, n, limit, c.fetch_process))
            if not c.warm:
                shutil.rmtree(cache, ignore_errors=True)  # a fetch still in flight may finish meanwhile
        done = ", ".join(f"{c.name} {c.passes[-1].rate / c.local[-1].rate:.2f}" for c in configs)
        print(f"round {r + 1}/{rounds} (x local): {done}; load {os.getloadavg()[0]:.1f}", flush=True)


def report(configs: list[Config]) -> str:
    local = [p for c in configs for p in c.local]
    rows = [["local disk (all pairs)", f"{median([p.rate for p in local]):.0f}", "1.00", "", "",
             f"{median([p.first_s for p in local]):.2f}",
             f"{median([p.cpu_ms for p in local]):.2f}", "",
             f"{median([p.server_ms for p in local]):.2f}"]]  # fmt: skip
    for c in configs:
        ratios = sorted(p.rate / q.rate for p, q in zip(c.passes, c.local, strict=True))
        rows.append([
            c.name,
            f"{median([p.rate for p in c.passes]):.0f}",
            f"{median(ratios):.2f}",
            f"{ratios[0]:.2f}-{ratios[-1]:.2f}",
            f"{median([p.wait_frac for p in c.passes]):.1%}",
            f"{median([p.first_s for p in c.passes]):.2f}",
            f"{median([p.cpu_ms for p in c.passes]):.2f}",
            f"{median([p.helper_ms for p in c.passes]):.2f}" if c.fetch_process else "",
            f"{median([p.server_ms for p in c.passes]):.2f}",
        ])  # fmt: skip
    header = ["source", "windows/s", "x local", "range", "shard wait", "1st window s", "CPU ms/window",
              "fetch process CPU ms/window", "server CPU ms/window"]  # fmt: skip
    return table(header, rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=128)
    p.add_argument("--per-shard", type=int, default=4, help="episodes per shard")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--read-ahead", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--epochs", type=int, default=2, help="epochs of windows per measured pass")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        synth(tmp / "data", episodes=args.episodes, vl_samples=0, image_size=args.image_size,
              episodes_per_shard=args.per_shard, progress=False)  # fmt: skip
        local = str(tmp / "data" / "robot")
        shards = sorted(Path(local).glob("shard-*.tar"))
        windows = sum(1 for _ in SourceStream(local, Reader(), 0, 16, True, 2, 4, BadSamples("fail"))._epoch_items())
        n = args.epochs * windows
        print(command_line())
        mb = sum(s.stat().st_size for s in shards) / 1e6
        print(f"{len(shards)} shards, {mb:.1f} MB, {windows} windows/epoch; {n} windows per pass; "
              f"{args.latency_ms:g} ms added per request; load average {os.getloadavg()[0]:.1f} on "
              f"{os.cpu_count()} cores", flush=True)  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=serve, args=(str(tmp / "data"), args.latency_ms / 1000, ["robot"], ready, stop))
        child.start()
        global SERVER_PID
        SERVER_PID = child.pid or 0
        try:
            http, endpoint = ready.get(timeout=180)
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            ra = args.read_ahead
            configs = [Config(f"{name} {temp}, read_ahead={ahead}{', threads' if not proc else ''}", url, ahead,
                              temp == "warm", proc)
                       for name, url in (("HTTP", f"{http}/robot"), ("S3", f"s3://{BUCKET}/robot"))
                       for ahead, temp, proc in ((ra, "cold", True), (ra, "cold", False), (ra, "warm", True),
                                                 (0, "cold", True))]  # fmt: skip
            run_rounds(configs, local, tmp, args.rounds, n, mb / 2e3)
        finally:
            stop.set()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        print(report(configs))
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
