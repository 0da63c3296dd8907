"""Inference latency of `Policy.predict` per action head (issue 13, item 4): tiny random model, CPU, batch 1.

Each head is the model a debug config builds (configs/debug.yaml, debug_parallel.yaml, debug_flow.yaml, and FAST
tokens with a tokenizer fitted here on smooth random chunks; the tiny random-weight LLaVA written from
transformers' config classes), wrapped in a `Policy` with identity normalisation
statistics, so the timing covers the whole inference path: tokenising, collating, the model and un-normalising.
The figures compare the heads' relative cost; they say nothing about a real backbone's latency.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_policy_latency.py [--threads 1] [--flow-steps 1 4]
        [--device cuda]   # on a GPU machine (not yet run: none was available)
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from bench_common import REPO, command_line, quiet_libraries, table

from vla_scale.config.load import load_config
from vla_scale.data.normalize import Normalizer
from vla_scale.model import build_model
from vla_scale.policy import Policy

ACTION_DIM, STATE_DIM = 7, 8  # the legacy layout: 6 arm dims + gripper; 7 state dims + gripper
INSTRUCTION = "pick up the red block and put it in the blue bowl"
HEADS = [  # (row name, config file, overrides)
    ("continuous mlp", "debug.yaml", []),
    ("continuous lstm", "debug.yaml", ["model.head.type=lstm"]),
    ("continuous gpt", "debug.yaml", ["model.head.type=gpt"]),
    ("discrete", "debug.yaml", ["model.action_space=discrete"]),
    ("parallel", "debug_parallel.yaml", []),
    ("flow", "debug_flow.yaml", []),
    ("FAST tokens", "debug.yaml", ["model.action_space=discrete", "model.discrete.tokenizer=fast"]),  # + fitted file
]
FAST_SCALE, FAST_VOCAB = 10.0, 256  # data_tools fit-fast's defaults


def fit_fast(chunk_size: int, path: Path) -> Path:
    """A FAST tokenizer fitted on smooth random chunks (random walks, a binary gripper) of the benchmark's layout.
    The untrained model rarely emits EOS, so its decoding runs to the most tokens a chunk can take: the slow case."""
    from vla_scale.model.fast_tokenizer import FastTokenizer

    rng = np.random.default_rng(0)
    steps = rng.standard_normal((2000, chunk_size, ACTION_DIM)).astype(np.float32) * 0.1
    chunks = np.cumsum(steps, axis=1) + rng.standard_normal((2000, 1, ACTION_DIM)).astype(np.float32)
    chunks[..., -1] = rng.integers(0, 2, (2000, 1))
    FastTokenizer.fit(chunks, binary_dims=1, scale=FAST_SCALE, vocab_size=FAST_VOCAB).save(path)
    return path


def make_policy(config: str, overrides: list[str], backbone_dir: Path, device: str = "cpu") -> Policy:
    """The config's model, untrained, behind a Policy whose normaliser leaves values as they are."""
    cfg = load_config(REPO / "configs" / config, [*overrides, f"model.backbone.pretrained={backbone_dir}"])
    cfg.model.backbone.gradient_checkpointing = False
    torch.manual_seed(0)
    model = build_model(cfg.model, ACTION_DIM, STATE_DIM, chunk_size=cfg.data.fwd_pred_next_n, load_clip=False)
    stats = {
        key: {"mean": np.zeros(dim, np.float32), "std": np.ones(dim, np.float32)}
        for key, dim in (("action", ACTION_DIM), ("state", STATE_DIM))
    }
    data = {
        "window_size": cfg.data.window_size,
        "fwd_pred_next_n": cfg.data.fwd_pred_next_n,
        "max_text_len": cfg.data.max_text_len,
        "action_dim": ACTION_DIM,
        "state_dim": STATE_DIM,
        "static_camera": "rgb",
        "wrist_camera": None,
    }
    return Policy(model, Normalizer(stats), {"data": data}, device=device)


def time_policy(policy: Policy, warmup: int, calls: int, image_size: int | None = None) -> list[float]:
    """Milliseconds per `predict` call, each on a fresh random frame and state (episode history kept).

    `image_size`: the frames' side (default: the tiny backbone's; an export records no tiny sizes)."""
    rng = np.random.default_rng(0)
    size = image_size or policy.model.cfg.backbone.tiny.image_size
    times = []
    for i in range(warmup + calls):
        frame = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        state = rng.standard_normal(policy.state_dim).astype(np.float32)
        state[-1] = float(i % 2)
        start = time.perf_counter()
        chunk = policy.predict(frame, INSTRUCTION, state)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    assert chunk.shape == (policy.chunk_size, policy.action_dim), chunk.shape
    return times


def row(name: str, policy: Policy, times: list[float]) -> list[str]:
    med, p90 = statistics.median(times), float(np.percentile(times, 90))
    n = policy.chunk_size
    return [name, f"{med:.2f}", f"{p90:.2f}", str(n), f"{n / med * 1e3:.0f}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (predict returns numpy: each call syncs)")
    parser.add_argument("--flow-steps", type=int, nargs="*", default=[], help="extra Euler step counts for flow")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_libraries()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_latency-") as tmp:
        for name, config, overrides in HEADS:
            if "model.discrete.tokenizer=fast" in overrides:
                chunk = load_config(REPO / "configs" / config).data.fwd_pred_next_n
                overrides = [*overrides, f"model.discrete.fast_path={fit_fast(chunk, Path(tmp) / 'fast.json')}"]
            policy = make_policy(config, overrides, Path(tmp) / "tiny-llava", args.device)
            if policy.model.cfg.action_space != "flow":
                rows.append(row(name, policy, time_policy(policy, args.warmup, args.calls)))
                continue
            flow = policy.model.cfg.flow
            for steps in dict.fromkeys([flow.num_steps, *args.flow_steps]):  # the configured count first
                flow.num_steps = steps
                policy.reset()
                label = f"{name}, {steps} Euler step{'s' * (steps > 1)}"
                rows.append(row(label, policy, time_policy(policy, args.warmup, args.calls)))
    print(f"$ {command_line()}")
    print(f"batch 1, {args.device}, {args.threads} torch thread(s), {args.calls} timed calls, {args.warmup} warm-up")
    print(table(["head", "median ms", "p90 ms", "N", "actions/s"], rows))


if __name__ == "__main__":
    main()
