"""The typed run configuration: one dataclass per YAML section, each checking its own keys.

Every field has a default that is safe for a tiny CPU run; the YAML files in `configs/` override
what a recipe needs. The sections live beside their checks in `schema_data`, `schema_model`
(+ `schema_mechanisms`), `schema_train` and `schema_debug`, and are re-exported here so
`from vla_scale.config.schema import ModelConfig` keeps working. `vla_scale.config.load` turns YAML
into these classes; `Config.validate` runs each section's `validate(prefix)` and the checks that
span sections.

Adding a section: write a dataclass with defaults and a `validate(self, prefix)` method, and add
one field to `Config` below. Loading, overrides, unknown-key hints, save, hash and diff follow from
that field alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from vla_scale.config.errors import ConfigError
from vla_scale.config.schema_data import AugmentConfig, DataConfig, SourceConfig
from vla_scale.config.schema_debug import DebugConfig
from vla_scale.config.schema_eval import PeriodicEvalConfig, check_eval_cadence
from vla_scale.config.schema_model import (
    HISTORY_HEADS,
    ActionHeadConfig,
    BackboneConfig,
    ClipRegConfig,
    DiscreteActionConfig,
    LoraConfig,
    LossWeightsConfig,
    ModelConfig,
    ResamplerConfig,
    TinyBackboneConfig,
    TinyClipConfig,
    check_fast_tokenizer,
    check_history_window,
    default_fast_path,
)
from vla_scale.config.schema_train import TRAINABLE_GROUPS, OptimConfig, StageConfig, TrainConfig, WandbConfig

__all__ = [
    "TRAINABLE_GROUPS",
    "ActionHeadConfig",
    "AugmentConfig",
    "BackboneConfig",
    "ClipRegConfig",
    "Config",
    "DataConfig",
    "DebugConfig",
    "DiscreteActionConfig",
    "LoraConfig",
    "LossWeightsConfig",
    "ModelConfig",
    "OptimConfig",
    "PeriodicEvalConfig",
    "ResamplerConfig",
    "RunConfig",
    "SourceConfig",
    "StageConfig",
    "TinyBackboneConfig",
    "TinyClipConfig",
    "TrainConfig",
    "WandbConfig",
    "validate",
]


@dataclass
class RunConfig:
    """Where a run lives and what makes it reproducible."""

    name: str = "debug"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 0


@dataclass
class Config:
    """One run, as described by one YAML file plus `section.key=value` overrides.

    The fields are the YAML sections, in the order `save_config` writes them.
    """

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval: PeriodicEvalConfig = field(default_factory=PeriodicEvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)

    def __post_init__(self) -> None:
        """Fill defaults that follow other sections, so the run directory and the export record the value used."""
        head = self.model.head
        if head.type in HISTORY_HEADS and head.max_history == 0:
            head.max_history = self.data.window_size
        if self.model.discrete.tokenizer == "fast" and not self.model.discrete.fast_path:
            self.model.discrete.fast_path = default_fast_path([s.path for s in self.data.sources])

    def validate(self, world_size: int | None = None) -> None:
        """Reject combinations that cannot run; `world_size` adds the checks of a job about to run (its size, the
        FAST tokenizer file it reads)."""
        for f in fields(self):
            check = getattr(getattr(self, f.name), "validate", None)
            if check is not None:
                check(f.name)
        check_history_window(self.model, self.data.window_size)
        for i, stage in enumerate(self.train.stages):
            if "lora" in stage.trainable and not self.model.lora.enabled:
                raise ConfigError(f"train.stages.{i}.trainable names 'lora' but model.lora.enabled is false")
        check_eval_cadence(self.eval, self.train.ckpt_every)
        if world_size is not None:
            check_fast_tokenizer(self.model, self.data.fwd_pred_next_n)  # a file, like the data: checked for a job
            self.train.grad_accum(world_size)
            self.debug.check_world_size(world_size)


def validate(cfg: Config, world_size: int | None = None) -> None:
    """`cfg.validate(world_size)`, for callers that hold the function (`vla_scale.config.validate`)."""
    cfg.validate(world_size)
