"""Samples/s from a loopback S3 server and a loopback HTTP server vs local disk (a script; pytest does not collect it).

Why: datasets at scale are streamed from object storage; with read-ahead the next shards are fetched while the
current one is decoded, so per-request latency should cost (almost) nothing. This reads the same synthetic
robot shards through `SourceStream` (windows decoded and normalised, as the training loader does) from:
local disk; HTTP (http.server) and S3 (moto server) with `--latency-ms` added to every request, with an empty
cache (cold) and a second pass over the filled cache (warm), with read-ahead and without (read_ahead=0).
Both servers run in a child process on 127.0.0.1 (so they do not share the reader's GIL); bandwidth is loopback,
so only the latency and the reader's CPU cost are measured. Each figure is the best of `--repeats` passes.

    python tests/benchmarks/bench_remote.py                   # 50 ms per request
    python tests/benchmarks/bench_remote.py --latency-ms 0 --episodes 48
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_tools.synth import synth  # noqa: E402
from data_tools.upload import upload  # noqa: E402
from tests.benchmarks.bench_common import command_line  # noqa: E402
from tests.data.remote_servers import BUCKET, S3_ENV, Faults, http_server, s3_server  # noqa: E402
from vla_scale.config.schema_data import StorageConfig  # noqa: E402
from vla_scale.data.stream import BadSamples, Reader, SourceStream  # noqa: E402


def rate(path: str, cache: Path | None, read_ahead: int, n: int) -> tuple[float, float, float]:
    """(samples/s over `n` items, start-up seconds, seconds the reader waited for shards) for one reader."""
    storage = StorageConfig(cache_dir=str(cache), read_ahead=read_ahead) if cache else None
    start = time.perf_counter()
    stream = SourceStream(path, Reader(), 0, 16, True, 2, 4, BadSamples("fail"), storage=storage)
    ready = time.perf_counter()
    waited = 0.0
    fetcher_open = None
    if stream.opener is not None:  # measure the time `open` blocks on a shard (the data wait read-ahead hides)
        make = stream.opener

        def opener(urls: list[str]):  # noqa: ANN202
            nonlocal fetcher_open
            fetcher_open = make(urls)
            return fetcher_open

        stream.opener = opener
    t0 = time.perf_counter()
    count = 0
    for _ in itertools.islice(iter(stream), n):
        count += 1
        if fetcher_open is not None:
            waited += fetcher_open.wait_s
            fetcher_open.wait_s = 0.0
    return count / (time.perf_counter() - t0), ready - start, waited


def serve(root: str, latency_s: float, local: str, ready, stop) -> None:  # noqa: ANN001 - multiprocessing objects
    """Child process: the HTTP server over `root` and a moto S3 server holding `local` at s3://BUCKET/robot."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    faults = Faults(latency_s=latency_s)
    with http_server(Path(root), faults) as (http, _), s3_server(faults) as (endpoint, _):
        upload(local, f"s3://{BUCKET}/robot")
        ready.put((http, endpoint))
        stop.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=64)
    p.add_argument("--per-shard", type=int, default=4)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp_str:
        tmp = Path(tmp_str)
        synth(tmp / "data", episodes=args.episodes, vl_samples=0, image_size=args.image_size,
              episodes_per_shard=args.per_shard, progress=False)  # fmt: skip
        local = tmp / "data" / "robot"
        shards = sorted(local.glob("shard-*.tar"))
        windows = sum(1 for _ in SourceStream(local, Reader(), 0, 16, True, 2, 4, BadSamples("fail"))._epoch_items())
        n = 2 * windows  # two epochs: the second starts its first shard without read-ahead
        print(command_line())
        mb = sum(s.stat().st_size for s in shards) / 1e6
        print(f"{len(shards)} shards, {mb:.1f} MB, {windows} windows/epoch; {n} windows per measurement; "
              f"{args.latency_ms:g} ms added per request")  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        child = ctx.Process(target=serve, args=(str(tmp / "data"), args.latency_ms / 1000, str(local), ready, stop))
        child.start()
        try:
            http, endpoint = ready.get(timeout=120)
            os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
            best = max((rate(str(local), None, 0, n) for _ in range(args.repeats)), key=lambda r: r[0])
            base = best[0]
            rows = [("local disk", *best)]
            for name, url in (("HTTP", f"{http}/robot"), ("S3", f"s3://{BUCKET}/robot")):
                for ahead in (2, 0):
                    for temp in ("cold", "warm"):
                        passes = []
                        for k in range(args.repeats):  # cold: a fresh cache each pass; warm: the filled one
                            cache = tmp / f"cache-{name}-{ahead}-{k if temp == 'cold' else 'warm'}"
                            if temp == "warm" and k == 0:
                                rate(url, cache, ahead, n)  # fill it
                            passes.append(rate(url, cache, ahead, n))
                        rows.append((f"{name} {temp}, read_ahead={ahead}", *max(passes, key=lambda r: r[0])))
        finally:
            stop.set()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        print(f"{'source':34s} {'windows/s':>10s} {'x local':>8s} {'start s':>8s} {'shard wait':>11s}")
        for name, r, startup, waited in rows:
            wait = f"{waited / (n / r):10.1%}"
            print(f"{name:34s} {r:10.1f} {r / base:8.2f} {startup:8.2f} {wait:>11s}")


if __name__ == "__main__":
    main()
