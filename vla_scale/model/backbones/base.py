"""The shared Hugging Face adapter: the contract implemented once for every HF VLM layout.

A family file subclasses `HFBackboneAdapter` and states only what differs: its HF class, where its
parts sit inside the model (attribute paths), how images become LM tokens and, where it has them,
special positions or logits. Sizes, special ids, module accessors, the decoder run on `inputs_embeds`,
image preprocessing, checkpointing and save/load are here.
"""

from __future__ import annotations

import functools
import os
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from vla_scale.model.backbones.contract import BackboneAdapter
from vla_scale.model.backbones.loading import load_backbone, load_pretrained_parts
from vla_scale.model.backbones.registry import get_backbone_class
from vla_scale.model.backbones.tiny import ensure_tiny_backbone, write_folder_once

# The contract, loader, registry lookup and tiny writer stay importable from here for callers written
# before the split (robovlm, sequence, discrete, train/prepare, clip_regularizer).
__all__ = [
    "BackboneAdapter",
    "HFBackboneAdapter",
    "ensure_tiny_backbone",
    "get_backbone_class",
    "load_backbone",
    "special_token_id",
    "write_folder_once",
]


def special_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as one token (not unknown), else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


class HFBackboneAdapter(BackboneAdapter):
    """A transformers VLM (`self.model`) with its tokenizer and image processor.

    The attribute paths default to the HF `*ForConditionalGeneration` layout
    (`model.model.{vision_tower, multi_modal_projector, language_model}` + `model.lm_head`).
    """

    model_class: ClassVar[type[nn.Module] | None] = None  # the HF class `from_pretrained` loads
    language_model_path: ClassVar[str] = "model.language_model"  # decoder stack run on inputs_embeds
    vision_path: ClassVar[str] = "model.vision_tower"
    projector_path: ClassVar[str | None] = "model.multi_modal_projector"
    lm_head_path: ClassVar[str] = "lm_head"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # Plain floats, not buffers: a bf16 cast of the module must not round them.
        self.image_mean = [float(x) for x in image_processor.image_mean]
        self.image_std = [float(x) for x in image_processor.image_std]
        self.rescale_factor = float(getattr(image_processor, "rescale_factor", 1 / 255))

    def _part(self, path: str) -> nn.Module:
        return functools.reduce(getattr, path.split("."), self.model)

    # --- sizes and special tokens -------------------------------------------------------------
    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def embed_dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    # --- modules ------------------------------------------------------------------------------
    @property
    def language_model(self) -> nn.Module:
        return self._part(self.language_model_path)

    @property
    def decoder_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    @property
    def vision_module(self) -> nn.Module:
        return self._part(self.vision_path)

    @property
    def projector(self) -> nn.Module | None:
        return None if self.projector_path is None else self._part(self.projector_path)

    @property
    def lm_head(self) -> nn.Module:
        return self._part(self.lm_head_path)

    # --- computation --------------------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(ids)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """A square resize (no crop: robot frames are already framed by the dataset), rescale and normalise."""
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B, C, H, W] (the Batch contract), got {images.dtype}")
        x = images.float()
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1)
        return (x * self.rescale_factor - mean) / std

    def tower_pixels(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → preprocessed pixels in the vision tower's dtype (what every tower is fed)."""
        vision_dtype = next(self.vision_module.parameters()).dtype
        return self.preprocess_images(images).to(vision_dtype)

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor | None:
        """Position ids for the LM, or None for the decoder's own default; families with special positions
        (PaliGemma's 1-indexed, Qwen's multimodal 3D, Kosmos-2's mask-derived) override this."""
        return None

    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The decoder stack is called directly: the families' top-level forwards insist on image placeholder ids.
        A 4-D `attention_bias` goes to the decoder as is (transformers' mask builders pass 4-D masks through)."""
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long() if attention_bias is None else attention_bias,
            position_ids=self.lm_position_ids(inputs_embeds, attention_mask, past),
            cache=past_key_values,
            use_cache=use_cache,
            return_dict=True,
        )
        return out.last_hidden_state, out.cache if use_cache else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Lets a caller project only the positions it needs (discrete action ids) instead of every position."""
        return self.lm_head(hidden)

    def enable_gradient_checkpointing(self) -> None:
        """Non-reentrant, so frozen inputs are fine."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # --- loading and saving -------------------------------------------------------------------
    @classmethod
    def pretrained_config(cls, path_or_id: str, trust_remote_code: bool) -> Any:
        """A config to load the checkpoint with instead of its saved one, or None (PaliGemma forces causality)."""
        return None

    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        trust_remote_code: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        offload_folder: str | None = None,
    ) -> HFBackboneAdapter:
        if cls.model_class is None:
            raise NotImplementedError(f"{cls.__name__} must set model_class or override from_pretrained")
        config = cls.pretrained_config(path_or_id, trust_remote_code)
        parts = load_pretrained_parts(
            cls.model_class, path_or_id, trust_remote_code, torch_dtype, config, device_map, offload_folder
        )
        return cls(*parts)

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)
