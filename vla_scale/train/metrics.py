"""Per-term metrics: one meter per key, reduced across ranks at log time, written to every sink.

The model returns a dict of named terms; `Meters.add` keeps a running sum per key
without syncing the device. At log time `Meters.reduce` averages every key over all
micro-steps of all ranks in one collective, and `MetricsWriter` hands the result to
the console, `metrics.jsonl` and wandb on rank 0.
"""

from __future__ import annotations

import json
import os
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from vla_scale.config.schema import WandbConfig


class Meters:
    """Running sums and counts per metric key on this rank.

    Sums stay as detached device tensors until `reduce`, so logging adds no host-device
    sync to every micro-step; the one sync happens at log time.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor | float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums[key] + (value.detach().float() if isinstance(value, torch.Tensor) else value)
            self.counts[key] += 1

    def reduce(self) -> dict[str, float]:
        """Mean of each key over every sample seen on every rank since the last reset (collective)."""
        local = {k: (float(self.sums[k]), self.counts[k]) for k in self.sums}
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[dict] = [{} for _ in range(dist.get_world_size())]
            dist.all_gather_object(gathered, local)
        else:
            gathered = [local]
        total: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
        for part in gathered:
            for k, (s, n) in part.items():
                total[k][0] += s
                total[k][1] += n
        self.sums.clear()
        self.counts.clear()
        return {k: s / n for k, (s, n) in sorted(total.items()) if n}


def wandb_mode(cfg: WandbConfig) -> str:
    """`auto` → online only when an API key is configured, offline otherwise (no network needed)."""
    if cfg.mode != "auto":
        return cfg.mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    netrc = Path.home() / ".netrc"
    has_key = bool(os.environ.get("WANDB_API_KEY")) or (netrc.is_file() and "api.wandb.ai" in netrc.read_text())
    return "online" if has_key else "offline"


class MetricsWriter:
    """Rank-0 sinks: `metrics.jsonl` (one object per logged step) and wandb; other ranks write nothing."""

    def __init__(self, run_dir: Path, run_name: str, cfg: WandbConfig, config_dict: dict, start_step: int):
        """`start_step` > 0 means a resume: records logged after that checkpoint (by the run that died)
        are dropped from metrics.jsonl, since those steps are about to be trained and logged again."""
        self.enabled = not dist.is_initialized() or dist.get_rank() == 0
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not self.enabled:
            return
        resume = start_step > 0
        if self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in kept if json.loads(line)["step"] <= start_step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.path)
        mode = wandb_mode(cfg)
        if mode != "disabled":
            import wandb

            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
            id_file.write_text(run_id)
            self.wandb = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                name=run_name,
                id=run_id,
                resume="allow" if resume else None,
                dir=str(run_dir),
                mode=mode,
                config=config_dict,
            )

    def write(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **values}
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All records of a run's metrics.jsonl, in order."""
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
