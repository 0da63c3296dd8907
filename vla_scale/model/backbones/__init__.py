"""Backbone adapters, one per VLM family, looked up by name (`model.backbone.family`)."""

from vla_scale.model.backbones import llava  # noqa: F401  (registers "llava")
from vla_scale.model.backbones.base import (
    BackboneAdapter,
    available_backbones,
    build_tiny_backbone,
    ensure_tiny_backbone,
    get_backbone_class,
    load_backbone,
    register_backbone,
)
from vla_scale.model.backbones.llava import LlavaAdapter

__all__ = [
    "BackboneAdapter",
    "LlavaAdapter",
    "available_backbones",
    "build_tiny_backbone",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "register_backbone",
]
