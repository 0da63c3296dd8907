"""Policy server figures (issue 15): request latency via `vla-scale serve` vs in-process `Policy.predict` on the same
export, throughput with 1/4/16 concurrent client processes, and a fixed-rate control loop with synchronous vs
asynchronous chunk execution (steps/s and the fraction of ticks that waited for a chunk). The latency rounds also
time a floor: the same observation bytes over a plain TCP socket to another process running the same
`Policy.predict`, with no websocket framing, no msgpack and no checks, which is what moving a request between two
processes costs on this machine before the protocol adds anything.

The export is the debug config's tiny random-weight LLaVA (8-step chunks) declared with two cameras; every request
carries two 224 x 224 frames, state and instruction, which the policy resizes to the tiny backbone's input. The
server is a separate process (`vla-scale serve --port 0`), one torch thread on each side; figures compare the
transport's cost with the model's, they say nothing about a real backbone's latency.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_server.py [--rounds 8] [--calls 25] [--latency-only]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import re
import select
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from bench_common import REPO, command_line, quiet_libraries, table

INSTRUCTION = "pick up the red block and put it in the blue bowl"
CAMERAS = ("rgb_static", "rgb_gripper")
SIDE = 224
CHUNK = 8


def write_export(out: Path) -> Path:
    """The debug model (seeded initial weights) as an export folder that takes a static and a wrist camera."""
    import torch
    import yaml
    from safetensors.torch import save_file

    from data_tools.synth import synth
    from vla_scale.config import load_config
    from vla_scale.data.format import Manifest
    from vla_scale.model import build_model
    from vla_scale.train.export import policy_spec

    synth(out / "data", episodes=2, vl_samples=1, image_size=32, seed=0, episodes_per_shard=2)
    cfg = load_config(
        REPO / "configs/debug.yaml",
        [f"model.backbone.pretrained={out / 'tiny-backbone'}", f"data.fwd_pred_next_n={CHUNK}"],
    )
    manifest = Manifest.load(out / "data" / "robot")
    torch.manual_seed(0)
    model = build_model(cfg.model, **manifest.robot_spaces.model_dims(), chunk_size=CHUNK, load_clip=False)
    policy = out / "policy"
    policy.mkdir()
    save_file(
        {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(policy / "model.safetensors")
    )
    model.adapter.save_pretrained(policy / "backbone")
    spec = policy_spec(cfg, manifest, tag="untrained")
    spec["data"].update(cameras=list(CAMERAS), static_camera=CAMERAS[0], wrist_camera=CAMERAS[1])
    (policy / "vla_config.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copyfile(out / "data" / "robot" / "stats.json", policy / "stats.json")
    return policy


def observations(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [
        {
            "images": {c: rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for c in CAMERAS},
            "state": rng.standard_normal(4).astype(np.float32),
            "instruction": INSTRUCTION,
        }
        for _ in range(n)
    ]


@contextmanager
def server_process(export: Path, threads: int, delay_ms: float = 0.0):
    """`vla-scale serve` on a free port; yields its ws:// URL; the process group is killed on exit."""
    cmd = [sys.executable, "-m", "vla_scale.cli", "serve", str(export), "--port", "0", "--delay-ms", str(delay_ms)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
    )
    try:
        deadline, seen = time.monotonic() + 300, ""
        while time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                seen += (line := proc.stdout.readline())
                if match := re.search(r"on (ws://[\d.]+:\d+)", line):
                    yield match.group(1)
                    break
        else:
            raise RuntimeError(f"the server did not start: {seen}")
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)


def raw_floor_server(export: str, threads: int, ports: Any) -> None:
    """The floor's server process: one connection; each request is the two frames and the state as raw bytes in a
    fixed layout, answered with the chunk's float32 bytes and the inference time (float64 ms)."""
    import torch

    from vla_scale.policy import Policy

    torch.set_num_threads(threads)
    quiet_libraries()
    policy = Policy.from_pretrained(export, device="cpu")
    sizes = [SIDE * SIDE * 3] * len(CAMERAS) + [4 * 4]
    buf = bytearray(sum(sizes))
    with socket.create_server(("127.0.0.1", 0)) as listener:
        ports.put(listener.getsockname()[1])
        sock, _ = listener.accept()
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with sock, memoryview(buf) as view:
        while True:
            got = 0
            while got < len(buf):
                n = sock.recv_into(view[got:])
                if not n:
                    return
                got += n
            parts, at = [], 0
            for size in sizes:
                parts.append(np.frombuffer(buf, np.uint8, size, at))
                at += size
            images = {c: parts[i].reshape(SIDE, SIDE, 3) for i, c in enumerate(CAMERAS)}
            start = time.perf_counter()
            actions = policy.predict(images, INSTRUCTION, parts[-1].view(np.float32))
            ms = (time.perf_counter() - start) * 1e3
            sock.sendall(np.asarray(actions, np.float32).tobytes() + struct.pack("<d", ms))


@contextmanager
def raw_floor(export: Path, threads: int, action_dim: int):
    """Start the floor's server; yields `infer(obs) -> server ms` over its socket (the frames sent in place)."""
    from vla_scale.serve.frames import send_all

    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    proc = ctx.Process(target=raw_floor_server, args=(str(export), threads, ports), daemon=True)
    proc.start()
    reply = CHUNK * action_dim * 4 + 8
    try:
        sock = socket.create_connection(("127.0.0.1", ports.get(timeout=300)))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def infer(o: dict) -> float:
            send_all(sock, [*(o["images"][c] for c in CAMERAS), o["state"]])  # one sendmsg, from the arrays
            data = b""
            while len(data) < reply:
                chunk = sock.recv(reply - len(data))
                if not chunk:
                    raise RuntimeError("the raw-socket floor server closed the connection")
                data += chunk
            np.frombuffer(data, np.float32, CHUNK * action_dim)
            return struct.unpack("<d", data[-8:])[0]

        with sock:
            yield infer
    finally:
        proc.kill()
        proc.join(timeout=30)


def fmt_load(load: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in load)


def ms_stats(times: list[float]) -> tuple[float, float]:
    return statistics.median(times) * 1e3, float(np.percentile(times, 90)) * 1e3


def time_calls(fn, obs: list[dict], warmup: int) -> list[float]:  # noqa: ANN001
    """Seconds per call of `fn` on each of `obs` after `warmup` untimed calls (on the first observations)."""
    for o in obs[:warmup]:
        fn(o)
    times = []
    for o in obs:
        start = time.perf_counter()
        fn(o)
        times.append(time.perf_counter() - start)
    return times


def interleaved_rounds(paths: dict, obs: list[dict], rounds: int, warmup: int) -> list[dict[str, list[float]]]:
    """`rounds` rounds over the same observations; each observation goes through every path back to back, the path
    that goes first rotating from one call to the next. Returns each round's seconds per call, by path.

    Why so fine-grained: on a shared machine the load changes within a second (the 2 cores here run other jobs),
    and a block of one path's calls, then a block of the other's, compares different loads. Calls of the same
    observation a few ms apart see the same load, and the rotation gives no path the warm-cache seat."""
    names, out = list(paths), []
    for r in range(rounds):
        for o in obs[:warmup]:
            for name in names:
                paths[name](o)
        times: dict[str, list[float]] = {name: [] for name in names}
        for i, o in enumerate(obs):
            k = (r * len(obs) + i) % len(names)
            for name in names[k:] + names[:k]:
                start = time.perf_counter()
                paths[name](o)
                times[name].append(time.perf_counter() - start)
        out.append(times)
    return out


def client_worker(url: str, seconds: float, seed: int, barrier: Any, results: Any) -> None:
    """A client process: once every client is connected (barrier), requests for `seconds`; reports the count of
    requests completed in that window and their latencies."""
    from vla_scale.serve import PolicyClient

    obs = observations(4, seed)
    with PolicyClient(url, timeout=600) as client:
        client.reset()
        client.infer(obs[0])  # its session exists before the clock starts
        barrier.wait(timeout=600)
        times, end = [], time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            client.infer(obs[len(times) % 4])
            if time.perf_counter() <= end:
                times.append(time.perf_counter() - start)
    results.put(times)


def throughput(url: str, clients: int, seconds: float) -> list[str]:
    """Requests/s over a window that all `clients` processes spend requesting at once."""
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(clients), ctx.Queue()
    procs = [ctx.Process(target=client_worker, args=(url, seconds, i, barrier, results)) for i in range(clients)]
    for p in procs:
        p.start()
    try:
        latencies = [results.get(timeout=900) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
    med, p90 = ms_stats([t for ts in latencies for t in ts])
    return [str(clients), f"{sum(map(len, latencies)) / seconds:.1f}", f"{med:.1f}", f"{p90:.1f}"]


def control_loop(url: str, rate: float, overlap: int, ticks: int) -> list[str]:
    """`ticks` control ticks at `rate` Hz; sync (overlap 0) or async chunk execution."""
    from vla_scale.serve import AsyncChunkExecutor, PolicyClient

    obs = observations(8, seed=1)
    with PolicyClient(url, timeout=600) as client:
        client.reset()
        client.infer(obs[0])  # warm the session
        executor = AsyncChunkExecutor(client.infer, overlap=overlap)
        start = next_tick = time.perf_counter()
        for t in range(ticks):
            executor.act(obs[t % len(obs)])
            next_tick = max(next_tick + 1 / rate, time.perf_counter())  # a late tick delays the ones after it
            time.sleep(max(0.0, next_tick - time.perf_counter()))
        wall = time.perf_counter() - start
        executor.close()
    s = executor.stats
    mode = f"async, overlap {overlap}" if overlap else "sync"
    return [
        mode,
        f"{ticks / wall:.1f}",
        f"{s.stalled_fraction:.1%}",
        f"{s.wait_s / ticks * 1e3:.1f}",
        str(s.skipped_actions),
    ]


def print_latency(
    args: argparse.Namespace,
    rounds: list[dict],
    inside: list[float],
    raw_inside: list[float],
    health: list[list[float]],
    loads: tuple,
) -> float:
    """The latency rounds and the overhead figures; returns the server's median round trip (ms)."""
    base, servers = "in-process", ("server", "raw socket")
    print(f"$ {command_line()}")
    print(f"tiny debug model, CPU, {args.threads} torch thread(s); 2 cameras x {SIDE}x{SIDE} uint8 + state per request")
    print(f"load average (1/5/15 min) before {fmt_load(loads[0])}, after the latency rounds {fmt_load(loads[1])}")
    print(f"\nlatency: {args.rounds} rounds x {args.calls} observations, each through every path in turn (rotating)")
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    rows = []
    for i, r in enumerate(rounds):
        rows.append(
            [str(i + 1), f"{med(r[base]):.2f}"]
            + [f"{med(r[k]):.2f} ({med(r[k]) / med(r[base]) - 1:+.1%})" for k in servers]
        )
    print(table(["round", "in-process ms", "server ms", "raw socket ms (floor)"], rows))
    pooled = {k: [t for r in rounds for t in r[k]] for k in (base, *servers)}
    print("all calls, medians: " + ", ".join(f"{k} {med(v):.2f} ms" for k, v in pooled.items()))
    print(f"inside the server (the inference itself, server_ms) {statistics.median(inside):.2f} ms")
    fixed = med(pooled["server"]) - statistics.median(inside)
    print(f"round trip minus server_ms (medians): {fixed:.2f} ms per request, {fixed / statistics.median(inside):.1%}")
    floor = med(pooled["raw socket"]) - statistics.median(raw_inside)
    print(
        f"raw socket floor (same bytes, no framing, encoding or checks): round trip minus its inference "
        f"{floor:.2f} ms, {floor / statistics.median(raw_inside):.1%}; the server adds {fixed - floor:.2f} ms to it"
    )
    hm, pm = (med(h) for h in health)
    print(f"health round trip {hm:.2f} ms; with the observation as payload (decoded, no inference) {pm:.2f} ms")
    for k in servers:
        # each call's ratio to the in-process call of the same observation made a few ms before or after it
        paired = [a / b for a, b in zip(pooled[k], pooled[base], strict=True)]
        per_round = [med(r[k]) / med(r[base]) for r in rounds]
        print(
            f"{k} overhead: {statistics.median(paired) - 1:+.1%} (median of per-call ratios); "
            f"ratio of medians {med(pooled[k]) / med(pooled[base]) - 1:+.1%}; "
            f"rounds {min(per_round) - 1:+.1%} to {max(per_round) - 1:+.1%}"
        )
    return med(pooled["server"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=25, help="observations per latency round (each on every path)")
    parser.add_argument("--rounds", type=int, default=8, help="latency rounds")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per path before each round")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, in-process and in the server")
    parser.add_argument("--clients", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each throughput run")
    parser.add_argument("--rate", type=float, default=50.0, help="control rate (Hz) of the control-loop rows")
    parser.add_argument("--overlaps", type=int, nargs="+", default=[2, 4, 6], help="async executor overlaps to run")
    parser.add_argument("--ticks", type=int, default=200, help="control ticks per control-loop row")
    parser.add_argument("--delay-ms", type=float, default=100.0, help="extra server inference time, slow-model rows")
    parser.add_argument("--slow-rate", type=float, default=20.0, help="control rate (Hz) of the slow-model rows")
    parser.add_argument("--latency-only", action="store_true", help="only the latency rounds")
    args = parser.parse_args()
    import torch

    from vla_scale.policy import Policy
    from vla_scale.serve import PolicyClient

    torch.set_num_threads(args.threads)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench_server-") as tmp:
        export = write_export(Path(tmp))
        policy = Policy.from_pretrained(export, device="cpu")
        obs = observations(args.calls)
        load_before = os.getloadavg()
        with (
            server_process(export, args.threads) as url,
            PolicyClient(url, timeout=600) as client,
            raw_floor(export, args.threads, policy.action_dim) as raw_infer,
        ):
            inside: list[float] = []  # the server's own time per request (checks, inference)
            raw_inside: list[float] = []  # the floor server's inference time

            def infer(o: dict) -> None:
                inside.append(client.request({"type": "infer", "obs": o})["server_ms"])

            def raw(o: dict) -> None:
                raw_inside.append(raw_infer(o))

            def predict(o: dict) -> None:
                policy.predict(o["images"], o["instruction"], o["state"])

            paths = {"in-process": predict, "server": infer, "raw socket": raw}
            rounds = interleaved_rounds(paths, obs, args.rounds, args.warmup)
            # the transport alone: a health request carrying the observation, which the server decodes
            health = [
                time_calls(fn, obs, args.warmup)
                for fn in (lambda o: client.health(), lambda o: client.request({"type": "health", "obs": o}))
            ]
        loads = (load_before, os.getloadavg())
        if args.latency_only:
            print_latency(args, rounds, inside, raw_inside, health, loads)
            return
        with server_process(export, args.threads) as url:
            rows = [throughput(url, n, args.seconds) for n in args.clients]
            loops = [control_loop(url, args.rate, o, args.ticks) for o in (0, *args.overlaps)]
        with server_process(export, args.threads, args.delay_ms) as url:
            slow = [control_loop(url, args.slow_rate, o, args.ticks) for o in (0, *args.overlaps)]
    sm = print_latency(args, rounds, inside, raw_inside, health, loads)
    print(f"\nthroughput, concurrent client processes, {args.seconds:.0f} s each (one model, requests serialised)")
    print(table(["clients", "requests/s", "median ms", "p90 ms"], rows))
    header = ["execution", "steps/s", "ticks waiting", "wait ms/tick", "stale rows skipped"]
    blocks = [(f"tiny model ({sm:.0f} ms/request)", args.rate, loops)]
    blocks.append((f"+{args.delay_ms:.0f} ms per inference", args.slow_rate, slow))
    for name, rate, block in blocks:
        print(f"\ncontrol loop at {rate:.0f} Hz, {args.ticks} ticks, chunk {CHUNK}, {name}")
        print(table(header, block))
        best = max(block[1:], key=lambda row: float(row[1]))
        print(f"best async / sync steps/s: {float(best[1]) / float(block[0][1]):.2f}x ({best[0]})")


if __name__ == "__main__":
    main()
