"""Data-wait fraction of a real training run whose datasets stream from loopback S3/HTTP, vs local disk (a script).

Why: the loader benchmark (bench_remote.py) shows a reader keeping up on its own; what matters in training is
whether a rank ever waits for its next batch. This trains configs/debug.yaml through `launchers/train.sh` (2 CPU
ranks, the tiny LLaVA) on the same synthetic robot + VL data from local disk, from the HTTP server and from the
moto S3 server, `--latency-ms` added to every request (servers in a child process), each remote run with an empty
shard cache, runs interleaved over `--rounds`. It prints, per run, `data_wait_frac` (time the ranks spent in
`next(data_iter)` over their wall time, logged by the training loop: vla_scale/train/log_window.py) and the
step time, for the whole run and without the first log window (DataLoader workers starting, the first shards).

    python tests/benchmarks/bench_remote_train.py                    # 50 ms per request, 60 steps, 2 rounds
    python tests/benchmarks/bench_remote_train.py --work runs/bench_remote_train --rounds 3
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from data_tools.synth import synth  # noqa: E402
from tests.benchmarks.bench_common import REPO, command_line, median, table  # noqa: E402
from tests.benchmarks.bench_remote import serve  # noqa: E402
from tests.data.remote_servers import BUCKET, S3_ENV  # noqa: E402
from vla_scale.train.metrics import read_metrics  # noqa: E402


def train(
    work: Path, name: str, robot: str, vl: str, steps: int, log_every: int, env: dict, overrides: list[str]
) -> tuple[list, float]:
    """One run of launchers/train.sh (2 CPU ranks); returns its metrics records and its wall time."""
    cmd = [
        "launchers/train.sh",
        "configs/debug.yaml",
        f"run.name={name}",
        f"run.output_dir={work / 'runs'}",
        f"model.backbone.pretrained={work / 'backbone'}",
        f"data.sources.0.path={robot}",
        f"data.sources.1.path={vl}",
        f"data.storage.cache_dir={work / ('cache-' + name)}",
        f"train.max_steps={steps}",
        f"train.log_every={log_every}",
        "train.ckpt_every=0",
        "wandb.mode=disabled",
        *overrides,
    ]
    for old in (work / "runs" / name, work / f"cache-{name}"):
        shutil.rmtree(old, ignore_errors=True)  # a run left there would be resumed; a cache left would be warm
    log = work / f"{name}.log"
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False, timeout=1800)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"training {name} failed (exit {proc.returncode}):\n{log.read_text()[-4000:]}")
    return read_metrics(work / "runs" / name), wall


def summary(records: list[dict], global_batch: int) -> tuple[float, float, float, float]:
    """(data_wait_frac over the run, and without the first log window; ms per step likewise), time-weighted."""
    steps = [r["step"] - prev for r, prev in zip(records, [0, *(x["step"] for x in records)], strict=False)]
    seconds = [n * global_batch / r["samples_per_s"] for n, r in zip(steps, records, strict=True)]

    def over(first: int) -> tuple[float, float]:
        waited = sum(r["data_wait_frac"] * s for r, s in zip(records[first:], seconds[first:], strict=True))
        return waited / sum(seconds[first:]), sum(seconds[first:]) / sum(steps[first:]) * 1e3

    (w_all, ms_all), (w_rest, ms_rest) = over(0), over(1)
    return w_all, w_rest, ms_all, ms_rest


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=48)
    p.add_argument("--per-shard", type=int, default=4, help="episodes per shard")
    p.add_argument("--latency-ms", type=float, default=50.0)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log-every", type=int, default=5)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--work", type=Path, default=None, help="keep runs and logs here (default: a temporary folder)")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a config override for every run, e.g. model.backbone.tiny.hidden_size=256 for a step as slow as a "
        "real one (the tiny backbone is built for the first run's config; use a fresh --work)",
    )
    args = p.parse_args()
    global_batch = 8  # configs/debug.yaml
    with tempfile.TemporaryDirectory() as tmp_str:
        work = (args.work or Path(tmp_str)).resolve()
        data = work / "data"
        if not (data / "vl" / "manifest.json").is_file():
            synth(data, episodes=args.episodes, vl_samples=args.episodes // 2, image_size=32, seed=0,
                  episodes_per_shard=args.per_shard, progress=False)  # fmt: skip
        print(command_line())
        print(f"{len(list((data / 'robot').glob('shard-*.tar')))} robot shards; {args.steps} steps of "
              f"{global_batch} samples; {args.latency_ms:g} ms added per request; load average "
              f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)  # fmt: skip
        ctx = multiprocessing.get_context("spawn")
        ready, stop = ctx.Queue(), ctx.Event()
        names = ["robot", "vl"]
        child = ctx.Process(target=serve, args=(str(data), args.latency_ms / 1000, names, ready, stop))
        child.start()
        rows = []
        try:
            http, endpoint = ready.get(timeout=180)
            env = {**os.environ, **S3_ENV, "AWS_ENDPOINT_URL": endpoint, "CPU_RANKS": "2", "OMP_NUM_THREADS": "1",
                   "WANDB_MODE": "disabled", "PYTHON": sys.executable}  # fmt: skip
            sources = {
                "local": [str(data / n) for n in names],
                "http": [f"{http}/{n}" for n in names],
                "s3": [f"s3://{BUCKET}/{n}" for n in names],
            }
            for r in range(args.rounds):
                for kind, (robot, vl) in sources.items():
                    records, wall = train(
                        work, f"{kind}-{r}", robot, vl, args.steps, args.log_every, env, args.override
                    )
                    w_all, w_rest, ms_all, ms_rest = summary(records, global_batch)
                    rows.append((kind, r, w_all, w_rest, ms_all, ms_rest, wall, os.getloadavg()[0]))
                    print(f"{kind} round {r + 1}: data_wait_frac {w_all:.2%} ({w_rest:.2%} after the first window), "
                          f"{ms_all:.0f} ms/step; load {rows[-1][-1]:.1f}", flush=True)  # fmt: skip
        finally:
            stop.set()
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        out = []
        local = {row[1]: row for row in rows if row[0] == "local"}
        for kind in sources:
            mine = [row for row in rows if row[0] == kind]
            extra = median([(row[3] - local[row[1]][3]) * 100 for row in mine])  # vs local in the same round
            out.append([kind, *(f"{median([row[i] for row in mine]):.2%}" for i in (2, 3)), f"{extra:+.1f}",
                        *(f"{median([row[i] for row in mine]):.0f}" for i in (4, 5, 6))])  # fmt: skip
        header = ["data from", "data_wait_frac", "after 1st window", "vs local, points", "ms/step",
                  "after 1st window", "run wall s"]  # fmt: skip
        print(table(header, out))
        print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
