"""Staged unfreezing: which parameters train at which step.

A stage names parameter groups (`train.stages[i].trainable`); this module turns the names
into parameter names of a built `RoboVLM` and flips `requires_grad`. The loop rebuilds the
DeepSpeed engine at each stage switch (see `vla_scale.train.engine.build_engine`), so
optimizer state exists only for what the current stage trains and frozen parameters are
never touched by the optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vla_scale.config.load import ConfigError
from vla_scale.config.schema import TRAINABLE_GROUPS, Config, StageConfig

if TYPE_CHECKING:
    from torch import nn  # annotations only: `vla-scale prepare` reads the stages without importing torch

ADAPTER_PREFIX = "adapter."
LORA_MARK = ".lora_"


@dataclass(frozen=True)
class Stage:
    """A resolved stage: its index, first step, learning-rate scale and trainable parameter names."""

    index: int
    start_step: int
    lr_scale: float
    trainable: frozenset[str]


def stage_configs(cfg: Config) -> list[StageConfig]:
    """The configured stages, or the default single stage: everything, or heads + LoRA when LoRA is on."""
    if cfg.train.stages:
        return list(cfg.train.stages)
    default = ["heads", "lora"] if cfg.model.lora.enabled else ["all"]
    return [StageConfig(start_step=0, trainable=default)]


def _names_of(model: nn.Module, module: nn.Module | None) -> set[str]:
    if module is None:
        return set()
    ids = {id(p) for p in module.parameters()}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def group_parameters(model: nn.Module, group: str) -> set[str]:
    """Parameter names (as in `model.named_parameters()`) of one named group of a RoboVLM.

    LoRA base weights count as part of the layer they sit in (so `decoder` unfreezes them
    too); `lora` is the adapter matrices only.
    """
    names = [name for name, _ in model.named_parameters()]
    adapter = model.adapter
    if group == "all":
        return set(names)
    if group == "heads":  # everything RoboVLM adds around the backbone
        return {n for n in names if not n.startswith(ADAPTER_PREFIX)}
    if group in ("action_head", "action_expert", "action_token", "state_encoder", "resampler"):
        return {n for n in names if n == group or n.startswith(group + ".")}
    if group == "lora":
        return {n for n in names if LORA_MARK in n}
    if group == "vision":
        return _names_of(model, adapter.vision_module)
    if group == "projector":
        return _names_of(model, adapter.projector)
    if group == "embeddings":
        return _names_of(model, adapter.model.get_input_embeddings())
    if group == "lm_head":
        return _names_of(model, adapter.lm_head)
    if group == "decoder":
        return _names_of(model, adapter.decoder_layers) - group_parameters(model, "lora")
    if group == "language_model":
        # Decoder layers, embeddings, the final norm and the LM head: the backbone minus vision and projector.
        backbone = {n for n in names if n.startswith(ADAPTER_PREFIX)}
        return (
            backbone
            - group_parameters(model, "vision")
            - group_parameters(model, "projector")
            - (group_parameters(model, "lora"))
        )
    match = re.fullmatch(r"decoder_last_([0-9]+)", group)
    if match:
        layers = adapter.decoder_layers
        n = int(match.group(1))
        if not 1 <= n <= len(layers):
            raise ConfigError(f"stage group {group!r}: the backbone has {len(layers)} decoder layers")
        picked: set[str] = set()
        for layer in list(layers)[-n:]:
            picked |= _names_of(model, layer)
        return picked - group_parameters(model, "lora")
    if group.startswith("re:"):
        try:
            pattern = re.compile(group[3:])
        except re.error as exc:
            raise ConfigError(f"stage group {group!r} is not a valid regular expression: {exc}") from exc
        return {n for n in names if pattern.search(n)}
    raise ConfigError(f"unknown parameter group {group!r}; known: {', '.join(TRAINABLE_GROUPS)}")


def resolve_stages(model: nn.Module, cfg: Config) -> list[Stage]:
    """Every stage with its parameter names; a group that selects nothing is a config error (before training)."""
    stages = []
    for i, sc in enumerate(stage_configs(cfg)):
        trainable: set[str] = set()
        for group in sc.trainable:
            names = group_parameters(model, group)
            if not names:
                raise ConfigError(
                    f"train.stages.{i}.trainable: {group!r} selects no parameter of this model "
                    f"(backbone family {cfg.model.backbone.family!r}); remove it or fix the pattern"
                )
            trainable |= names
        stages.append(Stage(index=i, start_step=sc.start_step, lr_scale=sc.lr_scale, trainable=frozenset(trainable)))
    return stages


def stage_at(stages: list[Stage], step: int) -> Stage:
    """The stage that trains optimizer step `step + 1` (i.e. after `step` steps have been taken)."""
    current = stages[0]
    for stage in stages:
        if stage.start_step <= step:
            current = stage
    return current


def apply_stage(model: nn.Module, stage: Stage) -> int:
    """Set `requires_grad` from the stage; returns the number of trainable parameters (elements)."""
    count = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in stage.trainable)
        if name in stage.trainable:
            count += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    return count
