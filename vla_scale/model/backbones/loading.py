"""Loading a pretrained backbone: dtype, processors, `trust_remote_code` and the `from_pretrained` calls.

Every family loads real checkpoints and its tiny test checkpoints through these same functions, so
a tiny checkpoint exercises the exact path a real one takes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from vla_scale.model.backbones.registry import get_backbone_class

if TYPE_CHECKING:
    from vla_scale.model.backbones.contract import BackboneAdapter


def resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None → float32 (transformers 5 would otherwise pick the checkpoint's dtype); strings like "bfloat16" → dtype."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        value = getattr(torch, torch_dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown torch dtype {torch_dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
        return value
    return torch_dtype


def load_processors(path_or_id: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """Tokenizer and image processor of a checkpoint (only the image processor's mean/std/rescale are used,
    so its PIL backend, which needs no torchvision, is enough)."""
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    backend = {} if is_torchvision_available() else {"backend": "pil"}
    image_processor = AutoImageProcessor.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **backend)
    return tokenizer, image_processor


def load_pretrained_parts(
    model_class: type[nn.Module],
    path_or_id: str,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    config: Any = None,
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
) -> tuple[nn.Module, Any, Any]:
    """(model, tokenizer, image processor) of a checkpoint; `config` replaces the saved one when given.

    `trust_remote_code` reaches the processors only: every supported family's model is in transformers itself.
    `device_map` ("auto", or module name -> device / "cpu" / "disk") and `offload_folder` go to transformers,
    which places the weights with accelerate (big-model inference: split over GPUs, offloaded parts moved in
    by hooks when they run); None loads everything on the CPU as before.
    """
    extra = {} if config is None else {"config": config}
    if device_map is not None:
        extra.update(device_map=device_map, offload_folder=offload_folder)
    model = model_class.from_pretrained(path_or_id, dtype=resolve_dtype(torch_dtype), **extra)
    tokenizer, image_processor = load_processors(path_or_id, trust_remote_code)
    return model, tokenizer, image_processor


def load_backbone(
    family: str,
    path_or_id: str,
    trust_remote_code: bool = False,
    torch_dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
) -> BackboneAdapter:
    """Load a family's checkpoint (local folder or hub id) through the registry (placement: `load_pretrained_parts`)."""
    if not path_or_id:
        raise ValueError("model.backbone.pretrained is empty: set it to a local folder or a hub id")
    cls = get_backbone_class(family)
    if device_map is None:
        return cls.from_pretrained(path_or_id, trust_remote_code, torch_dtype)
    return cls.from_pretrained(path_or_id, trust_remote_code, torch_dtype, device_map, offload_folder)


def build_empty_backbone(
    family: str, path_or_id: str, trust_remote_code: bool = False, torch_dtype: torch.dtype | str | None = None
) -> BackboneAdapter:
    """A family's backbone from the checkpoint's config with its weights on the meta device (accelerate's
    `init_empty_weights`): no memory and no weight read, for callers that load every weight afterwards
    (`model.load_state_dict(state, assign=True)`: an export's or a DeepSpeed checkpoint's full state dict).
    Buffers stay real (computed, not loaded). Tokenizer and image processor are read as usual."""
    from accelerate import init_empty_weights  # ~0.5 s of imports, only on these paths

    if not path_or_id:
        raise ValueError("model.backbone.pretrained is empty: set it to a local folder or a hub id")
    cls = get_backbone_class(family)
    model_class = getattr(cls, "model_class", None)
    if model_class is None:
        raise NotImplementedError(f"{cls.__name__} has no model_class to build from a config")
    config = cls.pretrained_config(path_or_id, trust_remote_code)
    if config is None:
        config = AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    dtype = resolve_dtype(torch_dtype)
    with init_empty_weights():
        model = model_class._from_config(config, dtype=config.dtype if dtype == "auto" else dtype)
    return cls(model, *load_processors(path_or_id, trust_remote_code))
