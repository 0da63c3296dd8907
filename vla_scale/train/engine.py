"""The one place that builds the distributed wrapper: process group, optimizer, schedule, DeepSpeed engine."""

from __future__ import annotations

import importlib
import math
import os
from datetime import timedelta

import torch
from torch import nn

from vla_scale.config.schema import Config, OptimConfig


def init_distributed(timeout_s: int) -> tuple[int, int]:
    """Start the process group the launcher described (gloo on CPU, NCCL on GPU); returns (rank, world)."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and not os.environ.get("VLA_SCALE_SHM_ALLREDUCE"):
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (40-80 s) that is only
        # used for inference all-reduce; training does not need it.
        comm_torch = importlib.import_module("deepspeed.comm.torch")
        comm_torch.build_shm_op = lambda: None
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=timedelta(seconds=timeout_s))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms, embeddings and learned tokens (1-D or embedding weights)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "action_token" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Multiplier on the base LR per optimizer step: linear warmup, then constant or cosine to min_lr_ratio."""

    def fn(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        span = max(1, max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return fn


def build_engine(model: nn.Module, cfg: Config, ds_config: dict):
    """Wrap `model` in a DeepSpeed engine with a torch AdamW (no JIT-compiled optimizer ops needed)."""
    import deepspeed

    o = cfg.optim
    optimizer = torch.optim.AdamW(param_groups(model, o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o, cfg.train.max_steps))
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    return engine, optimizer, scheduler
