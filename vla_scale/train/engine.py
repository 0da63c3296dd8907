"""The one place that builds the distributed wrapper: process group, optimizer, schedule, DeepSpeed engine."""

from __future__ import annotations

import importlib
import math
import os
import platform
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from vla_scale.config.load import ConfigError
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


def fast_cpu_info() -> dict:
    """The fields DeepSpeed reads from py-cpuinfo (arch, flags, vendor), taken from /proc/cpuinfo and uname.

    py-cpuinfo's `get_cpu_info` probes CPUID in a child process; on a loaded 2-core VM that probe was
    seen spinning for over ten minutes inside DeepSpeedCPUAdam's constructor.
    """
    machine = platform.machine().lower()
    arch = {"x86_64": "X86_64", "amd64": "X86_64", "aarch64": "ARM_8", "arm64": "ARM_8"}.get(machine, machine.upper())
    if machine.startswith("ppc"):
        arch = "PPC_64"
    elif machine.startswith("riscv"):
        arch = "riscv64"
    info: dict = {"arch": arch, "flags": [], "vendor_id_raw": "unknown"}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id":
            info["vendor_id_raw"] = value.strip()
        elif key in ("flags", "Features") and not info["flags"]:
            info["flags"] = value.split()
    return info


def build_optimizer(model: nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters: DeepSpeed's CPU Adam under optimizer offload, else the guarded torch one."""
    o = cfg.optim
    groups = param_groups(model, o.weight_decay)
    if not groups:
        raise ConfigError("no trainable parameters: the current stage's `trainable` list selects nothing")
    if cfg.train.offload_optimizer:
        import cpuinfo
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # JIT-compiles the cpu_adam op on first use

        cpuinfo.get_cpu_info = fast_cpu_info  # read by DeepSpeedCPUAdam and its op builder
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
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, optimizer
