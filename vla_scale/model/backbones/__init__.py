"""Backbone adapters, one per VLM family, looked up by name (`model.backbone.family`)."""

from vla_scale.model.backbones import (
    idefics3,  # noqa: F401  (registers "idefics3", "smolvlm")
    kosmos2,  # noqa: F401  (registers "kosmos2")
    llava,  # noqa: F401  (registers "llava")
    paligemma,  # noqa: F401  (registers "paligemma", "paligemma2")
    qwen2_vl,  # noqa: F401  (registers "qwen2_vl", "qwen2_5_vl")
)
from vla_scale.model.backbones.base import (
    BackboneAdapter,
    available_backbones,
    build_tiny_backbone,
    ensure_tiny_backbone,
    get_backbone_class,
    load_backbone,
    register_backbone,
)
from vla_scale.model.backbones.idefics3 import Idefics3Adapter, SmolVLMAdapter
from vla_scale.model.backbones.kosmos2 import Kosmos2Adapter
from vla_scale.model.backbones.llava import LlavaAdapter
from vla_scale.model.backbones.paligemma import PaliGemma2Adapter, PaliGemmaAdapter
from vla_scale.model.backbones.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter

__all__ = [
    "BackboneAdapter",
    "Idefics3Adapter",
    "Kosmos2Adapter",
    "LlavaAdapter",
    "PaliGemma2Adapter",
    "PaliGemmaAdapter",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "SmolVLMAdapter",
    "available_backbones",
    "build_tiny_backbone",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "register_backbone",
]
