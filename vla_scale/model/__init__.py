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
