"""Helpers shared by the benchmark scripts in this folder (not a benchmark itself; pytest does not collect it).

Benchmarks that need several ranks start them here with `torch.multiprocessing` (spawn) and
the environment a launcher would give each rank (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), so `vla_scale.train.engine.init_distributed` starts the same gloo (CPU) or NCCL
(GPU) process group as under `launchers/train.sh`. Each rank returns a JSON-able value, which
the parent collects: one process prints, the ranks only measure.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shlex
import socket
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[2]

# Settings every rank gets before torch starts its thread pools; OMP_NUM_THREADS (set per call)
# matters most: unset, CPU ranks oversubscribe the cores and run several times slower (NOTES-stack.md).
RANK_ENV = {"TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "MASTER_ADDR": "127.0.0.1"}


def command_line() -> str:
    """The command that is running, to print next to the figures it produced."""
    return shlex.join([os.path.relpath(sys.executable, REPO), *sys.argv])


def free_port() -> int:
    """A TCP port nobody listens on now, so parallel jobs do not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def rss_mb() -> float:
    """Resident set size of this process now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _rank_entry(
    rank: int, world: int, port: int, threads: int, fn: Callable[..., Any], args: tuple, out_dir: str
) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_PORT=str(port))
    # A spawned child inherits "spawn" as its default start method; launcher-started ranks fork their
    # DataLoader workers, so do the same here (workers start in a second instead of re-importing torch).
    multiprocessing.set_start_method("fork", force=True)
    torch.set_num_threads(threads)
    result = fn(rank, world, *args)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, *args: Any, threads_per_rank: int = 1) -> list[Any]:
    """Run `fn(rank, world, *args)` in `world` spawned processes; returns each rank's result, by rank.

    `fn` must be a module-level function (spawn pickles it by name). An exception in any rank
    raises here with that rank's traceback, and the other ranks are terminated.
    """
    env = dict(RANK_ENV, OMP_NUM_THREADS=str(threads_per_rank))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # silences DeepSpeed's accelerator warning
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        with tempfile.TemporaryDirectory(prefix="bench_ranks_") as out_dir:
            args_ = (world, free_port(), threads_per_rank, fn, args, out_dir)
            mp.start_processes(_rank_entry, args=args_, nprocs=world, join=True, start_method="spawn")
            return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(world)]
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """Swap one attribute of a module or class for the duration of a block (library code itself is not edited)."""
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def quiet_libraries() -> None:
    """DeepSpeed logs every engine build at INFO and transformers draws a bar per load; benchmarks print figures."""
    import logging

    import transformers
    from deepspeed.utils import logger

    logger.setLevel(logging.WARNING)
    transformers.utils.logging.disable_progress_bar()


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain fixed-width table (also valid enough to paste into Markdown with `|` added)."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
