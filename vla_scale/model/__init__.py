"""The policy model: RoboVLM (backbone adapter + token fusion + action head) and the backbone registry."""

from vla_scale.model.action_head import MLPActionHead
from vla_scale.model.backbones import (
    BackboneAdapter,
    available_backbones,
    build_tiny_backbone,
    ensure_tiny_backbone,
    get_backbone_class,
    load_backbone,
    register_backbone,
)
from vla_scale.model.robovlm import FusedSequence, RoboVLM, build_model

__all__ = [
    "BackboneAdapter",
    "FusedSequence",
    "MLPActionHead",
    "RoboVLM",
    "available_backbones",
    "build_model",
    "build_tiny_backbone",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "register_backbone",
]
