"""Backbone adapters, one per VLM family, looked up by name (`model.backbone.family`).

The files, one job each: `contract.py` (what RoboVLM needs of a VLM), `base.py` (that contract for the
HF layouts), one file per family, `registry.py` (the explicit name → adapter table), `loading.py`
(`from_pretrained`, dtype, processors), `tiny.py` / `tiny_families.py` / `tiny_tokenizer.py` (random-weight
test checkpoints). Names are exported lazily: importing this package, or `registry`, loads no torch or
transformers; the first use of an adapter, loader or builder does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vla_scale.lazy import lazy_exports

_EXPORTS = {
    "BackboneAdapter": "contract",
    "HFBackboneAdapter": "base",
    "Idefics3Adapter": "idefics3",
    "Kosmos2Adapter": "kosmos2",
    "LlavaAdapter": "llava",
    "PaliGemma2Adapter": "paligemma",
    "PaliGemmaAdapter": "paligemma",
    "Qwen25VLAdapter": "qwen2_vl",
    "Qwen2VLAdapter": "qwen2_vl",
    "SmolVLMAdapter": "idefics3",
    "UnknownBackboneError": "registry",
    "available_backbones": "registry",
    "build_tiny_backbone": "tiny",
    "check_backbone_family": "registry",
    "ensure_tiny_backbone": "tiny",
    "get_backbone_class": "registry",
    "load_backbone": "loading",
    "register_backbone": "registry",
}

__all__ = [
    "BackboneAdapter",
    "HFBackboneAdapter",
    "Idefics3Adapter",
    "Kosmos2Adapter",
    "LlavaAdapter",
    "PaliGemma2Adapter",
    "PaliGemmaAdapter",
    "Qwen25VLAdapter",
    "Qwen2VLAdapter",
    "SmolVLMAdapter",
    "UnknownBackboneError",
    "available_backbones",
    "build_tiny_backbone",
    "check_backbone_family",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "register_backbone",
]

if TYPE_CHECKING:
    from vla_scale.model.backbones.base import HFBackboneAdapter
    from vla_scale.model.backbones.contract import BackboneAdapter
    from vla_scale.model.backbones.idefics3 import Idefics3Adapter, SmolVLMAdapter
    from vla_scale.model.backbones.kosmos2 import Kosmos2Adapter
    from vla_scale.model.backbones.llava import LlavaAdapter
    from vla_scale.model.backbones.loading import load_backbone
    from vla_scale.model.backbones.paligemma import PaliGemma2Adapter, PaliGemmaAdapter
    from vla_scale.model.backbones.qwen2_vl import Qwen2VLAdapter, Qwen25VLAdapter
    from vla_scale.model.backbones.registry import (
        UnknownBackboneError,
        available_backbones,
        check_backbone_family,
        get_backbone_class,
        register_backbone,
    )
    from vla_scale.model.backbones.tiny import build_tiny_backbone, ensure_tiny_backbone


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
