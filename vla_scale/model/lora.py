"""LoRA through `peft`, injected in place into the language model's decoder layers.

In place (not a `PeftModel` wrapper) so the adapter, RoboVLM and DeepSpeed see the same
module tree with or without LoRA: a wrapped layer keeps its original weight as
`<layer>.base_layer.weight` and gains `<layer>.lora_A/B.default.weight`. Export either
merges the adapters back into plain layers (`merge_lora`) or keeps them.
"""

from __future__ import annotations

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from torch import nn

from vla_scale.config.schema import LoraConfig

BASE_LAYER = ".base_layer"


def apply_lora(decoder_layers: nn.Module, cfg: LoraConfig) -> int:
    """Wrap the configured linear layers of `decoder_layers` with LoRA adapters; returns how many were wrapped."""
    targets: str | list[str] = "all-linear" if cfg.target_modules == ["all-linear"] else list(cfg.target_modules)
    peft_cfg = PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets)
    try:
        inject_adapter_in_model(peft_cfg, decoder_layers)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise ValueError(
            f"model.lora.target_modules={cfg.target_modules} matched no linear layer of the decoder layers; "
            f"use [all-linear] or names of linear modules inside a decoder layer ({exc})"
        ) from exc
    wrapped = sum(isinstance(m, LoraLayer) for m in decoder_layers.modules())
    if wrapped == 0:
        raise ValueError(f"model.lora.target_modules={cfg.target_modules} wrapped no layer")
    return wrapped


def has_lora(module: nn.Module) -> bool:
    return any(isinstance(m, LoraLayer) for m in module.modules())


@torch.no_grad()
def merge_lora(module: nn.Module) -> int:
    """Fold every LoRA adapter into its base layer and put the plain layer back; returns how many were merged.

    Afterwards the module has the original (LoRA-free) parameter names and computes the same function.
    """
    merged = 0
    for name, sub in list(module.named_modules()):
        if not isinstance(sub, LoraLayer):
            continue
        sub.merge()
        parent_name, _, child = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, child, sub.get_base_layer())
        merged += 1
    return merged


def base_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with LoRA adapters dropped and base weights under their original names (unmerged)."""
    return {k.replace(BASE_LAYER, ""): v for k, v in state.items() if ".lora_" not in k}
