"""`optim:`, `train:` and `wandb:` — the optimizer, the DeepSpeed engine, the loop and its logging."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from vla_scale.config.errors import ConfigError, check_at_least, suggest


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0

    def validate(self, prefix: str = "optim") -> None:
        """What AdamW would refuse inside the ranks, and a learning rate that cannot train."""
        if not self.lr > 0:
            raise ConfigError(
                f"{prefix}.lr must be > 0, got {self.lr}: the learning rate scales every update, so "
                f"{'0 trains nothing' if self.lr == 0 else 'a negative one ascends the loss'}; to keep parameters "
                "fixed, leave them out of train.stages' trainable groups instead"
            )
        if len(self.betas) != 2:
            raise ConfigError(f"{prefix}.betas needs two numbers, got {self.betas}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"{prefix}.betas must both be in [0, 1), got {self.betas}")
        check_at_least(self, prefix, ("weight_decay", "eps", "warmup_steps"), 0)
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"{prefix}.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


# Named parameter groups a stage can make trainable (resolved in `vla_scale.train.stages`);
# also `decoder_last_<N>` and `re:<regex>`.
TRAINABLE_GROUPS = (
    "all",
    "heads",
    "action_head",
    "action_expert",
    "action_token",
    "state_encoder",
    "resampler",
    "vision",
    "projector",
    "embeddings",
    "lm_head",
    "decoder",
    "language_model",
    "lora",
)


@dataclass
class StageConfig:
    """One stage of the unfreezing schedule: from `start_step` on, only `trainable` parameters train.

    Names (see `vla_scale.train.stages`): heads, action_head, action_token, state_encoder,
    resampler, vision, projector, embeddings, lm_head, decoder, decoder_last_<N>,
    language_model, lora, all, or `re:<regex>` over parameter names.
    """

    start_step: int = 0
    trainable: list[str] = field(default_factory=lambda: ["all"])
    lr_scale: float = 1.0

    def validate(self, prefix: str) -> None:
        """The stage's own values; the order of stages is checked by `TrainConfig`."""
        if self.lr_scale <= 0:
            raise ConfigError(f"{prefix}.lr_scale must be > 0, got {self.lr_scale}")
        if not self.trainable:
            raise ConfigError(f"{prefix}.trainable is empty: name at least one parameter group")
        for name in self.trainable:
            if name.startswith("re:") or re.fullmatch(r"decoder_last_[1-9][0-9]*", name):
                continue
            if name not in TRAINABLE_GROUPS:
                hint = suggest(name, [*TRAINABLE_GROUPS, "decoder_last_2", "re:<regex>"])
                raise ConfigError(f"{prefix}.trainable: unknown parameter group {name!r}.{hint}")


@dataclass
class TrainConfig:
    """The DeepSpeed engine and the loop around it."""

    max_steps: int = 10
    micro_batch_size: int = 2  # per rank, per forward
    global_batch_size: int = 4  # micro_batch_size x world_size x grad accumulation
    zero_stage: int = 2
    bf16: bool = False
    fp16: bool = False  # dynamic loss scaling; the scale is logged as `loss_scale`
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and step on CPU (DeepSpeed cpu_adam)
    offload_params: bool = False  # ZeRO-3: parameters live on CPU between uses
    grad_clip: float = 1.0
    log_every: int = 1
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    process_group_timeout_s: int = 600
    # A step whose loss or gradients are NaN/inf is skipped; this many in a row stop the run.
    max_bad_steps: int = 5
    # Preemption: this signal makes every rank finish its step, checkpoint and exit 75 (vla_scale/train/preempt.py).
    preempt_signal: Literal["SIGTERM", "SIGUSR1", "none"] = "SIGTERM"
    # Unfreezing schedule; empty = one stage training everything (or heads + LoRA when LoRA is on).
    stages: list[StageConfig] = field(default_factory=list)

    def validate(self, prefix: str = "train") -> None:
        """Batch sizes, precision, offload and the stage schedule; `grad_accum` adds the world-size check."""
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"{prefix}.zero_stage: {self.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
        check_at_least(self, prefix, ("max_steps", "micro_batch_size", "global_batch_size", "log_every"), 1)
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{prefix}.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"{prefix}.micro_batch_size ({self.micro_batch_size})"
            )
        if self.bf16 and self.fp16:
            raise ConfigError(f"{prefix}.bf16 and {prefix}.fp16 are both on; pick one precision")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ConfigError(f"{prefix}.offload_optimizer needs ZeRO: set {prefix}.zero_stage to 1, 2 or 3")
        if self.offload_params and self.zero_stage != 3:
            raise ConfigError(
                f"{prefix}.offload_params needs ZeRO-3: set {prefix}.zero_stage=3 (or turn offload_params off)"
            )
        check_at_least(self, prefix, ("max_bad_steps",), 1)
        previous = -1
        for i, stage in enumerate(self.stages):
            key = f"{prefix}.stages.{i}"
            if i == 0 and stage.start_step != 0:
                raise ConfigError(f"{key}.start_step must be 0: the first stage covers the start of the run")
            if stage.start_step <= previous:
                raise ConfigError(f"{key}.start_step ({stage.start_step}) must be greater than the previous stage's")
            previous = stage.start_step
            stage.validate(key)

    def grad_accum(self, world_size: int, prefix: str = "train") -> int:
        """Micro-steps per optimizer step that keep `global_batch_size` fixed at `world_size` ranks."""
        per_step = self.micro_batch_size * world_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                f"{prefix}.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"{prefix}.micro_batch_size x world size ({self.micro_batch_size} x {world_size}); "
                "change one of them or the number of ranks"
            )
        return self.global_batch_size // per_step


@dataclass
class WandbConfig:
    """Weights & Biases; `auto` means online with an API key, offline without."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "vla_scale"
    entity: str | None = None
