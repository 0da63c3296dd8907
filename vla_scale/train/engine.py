"""The one place that builds the distributed wrapper: process group, optimizer, schedule, DeepSpeed engine."""

from __future__ import annotations

import gc
import json
import math
import os
import resource
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from vla_scale.compat import (
    import_muon_with_lazy_kernels,
    remove_engine_forward_hooks,
    skip_shm_allreduce_build,
    use_fast_cpu_info,
)
from vla_scale.config import ConfigError
from vla_scale.config.schema import Config, OptimConfig
from vla_scale.train.build_ops import use_environment_extensions_dir
from vla_scale.train.stages import Stage, apply_stage, stage_at


def init_distributed(timeout_s: int, shm_allreduce: bool = False) -> tuple[int, int]:
    """Start the process group the launcher described (gloo on CPU, NCCL on GPU); returns (rank, world).

    `shm_allreduce` (`debug.shm_allreduce`) keeps DeepSpeed's CPU shared-memory all-reduce build.
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu" and not shm_allreduce:
        skip_shm_allreduce_build()  # a 40-80 s JIT compile of an op only inference uses
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


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that refuses a step whose gradients hold NaN or inf, agreed across ranks.

    DeepSpeed's ZeRO optimizers skip such steps themselves only when they compute a grad norm
    (clipping on, or fp16/bf16 overflow checks); ZeRO-0 in fp32 has no check at all. Under ZeRO
    each rank sees only its gradient partition, so the verdict is all-reduced before anyone
    steps. `overflow` is what DeepSpeed's engine reads to count a skipped step.
    """

    def __init__(self, *args, check: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.check = check  # off where DeepSpeed's own overflow check already covers the step
        self.overflow = False

    @torch.no_grad()
    def step(self, closure=None):
        if not self.check:
            return super().step(closure)
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        device = grads[0].device if grads else torch.device("cpu")
        bad = torch.zeros((), device=device)
        for grad in grads:
            bad = torch.maximum(bad, (~torch.isfinite(grad)).any().float())
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        self.overflow = bool(bad.item())
        if self.overflow:
            return None
        return super().step(closure)


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: DeepSpeed's CPU Adam under optimizer offload, else the guarded torch one."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ConfigError("no trainable parameters: the current stage's `trainable` list selects nothing")
    if cfg.train.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-compiles the cpu_adam op on first use

        use_environment_extensions_dir()  # where `make install` built it (python -m vla_scale.train.build_ops)
        use_fast_cpu_info()  # read by DeepSpeedCPUAdam and its op builder
        return DeepSpeedCPUAdam(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, adamw_mode=True)
    # ZeRO 1-3 skip non-finite steps themselves when they compute a grad norm (clipping on) or check
    # bf16/fp16 overflow; the guard's extra passes over the gradients are only needed elsewhere.
    t = cfg.train
    deepspeed_checks = t.zero_stage > 0 and (t.grad_clip > 0 or t.bf16 or t.fp16)
    return GuardedAdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, check=not deepspeed_checks)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The learning rate is a pure function of (step, stage), set before every step: nothing to checkpoint."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_engine(model: nn.Module, cfg: Config, ds_config: dict):
    """Wrap `model` in a DeepSpeed engine over its currently trainable parameters; returns (engine, optimizer).

    Called again at every stage switch (after `engine.destroy()`), so optimizer state only ever
    exists for what the stage trains. The returned optimizer is the base one whose `lr` the loop sets.
    """
    import deepspeed

    optimizer = build_optimizer(model, cfg)
    import_muon_with_lazy_kernels()  # ~0.6 s per rank for kernels of an optimizer vla_scale never builds
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer


def memory_mb() -> float:
    """Memory in use now on this rank: allocated device memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state (Adam moments) this rank holds."""
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / 2**20


class StagedEngine:
    """The DeepSpeed engine of the current unfreezing stage, rebuilt when the schedule moves to the next.

    A fresh engine per stage means optimizer state only ever exists for what the stage trains. After
    the first step of each stage, `report_stage` prints the memory the switch cost on this rank.
    """

    def __init__(self, model: nn.Module, cfg: Config, ds_config: dict, stages: list[Stage], rank: int):
        self.model, self.cfg, self.ds_config, self.stages, self.rank = model, cfg, ds_config, stages, rank
        self.stage: Stage | None = None
        self.engine = None
        self.optimizer: torch.optim.Optimizer | None = None
        self._report: dict | None = None

    def enter(self, stage: Stage) -> None:
        """Make `stage`'s parameters trainable and build a fresh engine over them (freeing the old one)."""
        if self.engine is not None:
            self.engine.destroy()
            # destroy() leaves the engine's forward hooks on the model, which keep the old engine (its
            # optimizer state, masters and gradient buffers) alive: remove them so it can be freed.
            remove_engine_forward_hooks(self.engine)
            self.engine = self.optimizer = None
            gc.collect()
        before = memory_mb()
        trainable = apply_stage(self.model, stage)
        self.engine, self.optimizer = build_engine(self.model, self.cfg, self.ds_config)
        self.stage = stage
        self._report = {"stage": stage.index, "trainable_params": trainable, "mem_before_switch_mb": before}

    def switch_if_due(self, step: int) -> bool:
        """Enter the stage that trains step `step + 1` if it is not the current one; True when it switched."""
        wanted = stage_at(self.stages, step)
        if self.stage is not None and wanted.index == self.stage.index:
            return False
        self.enter(wanted)
        return True

    def report_stage(self, step: int) -> dict | None:
        """Once per stage, after its first step (when the optimizer state exists): per-rank memory, printed."""
        if self._report is None:
            return None
        report, self._report = self._report, None
        report.update(optim_state_mb=optimizer_state_mb(self.optimizer), mem_after_switch_mb=memory_mb())
        where = f"rank {self.rank} stage {report['stage']} after step {step}"
        print(f"[vla_scale] {where}: {json.dumps(report)}", flush=True)
        return report
