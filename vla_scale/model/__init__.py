"""The policy model: RoboVLM (backbone adapter + token fusion + action head) and the backbone registry.

Names are imported on first access (PEP 562), so importing a light submodule such as
`vla_scale.model.backbones.registry` does not load torch, transformers and the whole model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vla_scale.lazy import lazy_exports

_EXPORTS = {  # name -> submodule that defines it
    "BackboneAdapter": "backbones",
    "ClipRegularizer": "clip_regularizer",
    "ClipTextTeacher": "clip_regularizer",
    "FusedSequence": "sequence",
    "MLPActionHead": "action_head",
    "PerceiverResampler": "resampler",
    "RoboVLM": "robovlm",
    "SequenceBuilder": "sequence",
    "available_backbones": "backbones",
    "build_model": "robovlm",
    "build_tiny_backbone": "backbones",
    "ensure_tiny_backbone": "backbones",
    "get_backbone_class": "backbones",
    "load_backbone": "backbones",
    "register_backbone": "backbones",
}

if TYPE_CHECKING:
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
    from vla_scale.model.clip_regularizer import ClipRegularizer, ClipTextTeacher
    from vla_scale.model.resampler import PerceiverResampler
    from vla_scale.model.robovlm import RoboVLM, build_model
    from vla_scale.model.sequence import FusedSequence, SequenceBuilder

__all__ = [
    "BackboneAdapter",
    "ClipRegularizer",
    "ClipTextTeacher",
    "FusedSequence",
    "MLPActionHead",
    "PerceiverResampler",
    "RoboVLM",
    "SequenceBuilder",
    "available_backbones",
    "build_model",
    "build_tiny_backbone",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "register_backbone",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
