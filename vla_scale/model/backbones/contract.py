"""The adapter contract: everything RoboVLM, the engine and the exporter ask of a pretrained VLM.

RoboVLM never touches a Hugging Face model directly; it embeds tokens, encodes images into the
LM's embedding space, runs the LM on `inputs_embeds` and reaches named modules (staged unfreezing,
LoRA targeting, gradient checkpointing) through this interface. `base.HFBackboneAdapter` implements
it once for the HF layouts; a family file then states only where it differs.

Shapes: B batch, L sequence length, D `hidden_size`, V vocabulary size, N image tokens per image.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn


class BackboneAdapter(nn.Module, ABC):
    """One VLM family behind the interface RoboVLM needs.

    `model` is the wrapped VLM (a submodule, so its parameters are ours for the optimizer, ZeRO and
    LoRA); `tokenizer` and `image_processor` are the checkpoint's own.
    """

    family: str = ""  # the name in `registry.BACKBONES` (`model.backbone.family`)
    image_start_id: int | None = None  # token that opens an image span in the fused sequence, if the family has one
    image_end_id: int | None = None  # token that closes it
    # Set by RoboVLM when a resampler replaces the tower's tokens by latents that have no patch grid:
    # families whose positions follow the grid (Qwen's multimodal RoPE) then give them 1D positions.
    images_resampled: bool = False
    custom_mask: bool = True  # the LM takes a prepared 4-D attention mask (`lm_forward(attention_bias=...)`)
    model: nn.Module
    tokenizer: Any
    image_processor: Any

    # --- sizes and special tokens -------------------------------------------------------------
    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width D of the language model's embeddings."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Square side the vision tower expects; uint8 images are resized to it."""

    @property
    @abstractmethod
    def embed_dtype(self) -> torch.dtype:
        """Dtype of the LM input embeddings (bf16 under DeepSpeed bf16); fused inputs are cast to it."""

    @property
    @abstractmethod
    def bos_id(self) -> int | None:
        """Begin-of-sequence id, or None when the family prepends none (Qwen)."""

    @property
    @abstractmethod
    def eos_id(self) -> int | None:
        """End-of-sequence id (ends VL answers and discrete action decoding)."""

    @property
    @abstractmethod
    def pad_id(self) -> int | None:
        """Padding id of the tokenizer."""

    # --- modules (staged unfreezing, checkpointing, LoRA targeting) -------------------------------
    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack that runs on `inputs_embeds` (no vision tower, no vocabulary projection)."""

    @property
    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The LM decoder layers, in order."""

    @property
    @abstractmethod
    def vision_module(self) -> nn.Module:
        """The vision tower."""

    @property
    @abstractmethod
    def projector(self) -> nn.Module | None:
        """The vision-to-LM projector (connector, resampler), or None when the family has none."""

    @property
    @abstractmethod
    def lm_head(self) -> nn.Module:
        """The vocabulary projection `[..., D]` → `[..., V]`."""

    # --- computation --------------------------------------------------------------------------
    @abstractmethod
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[...]` → LM input embeddings `[..., D]` (scaled as the family's LM expects them)."""

    @abstractmethod
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → float pixels `[B, C, image_size, image_size]`, normalised for the tower."""

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` (any H, W) → image tokens `[B, N, D]` in the LM embedding space, `embed_dtype`."""

    def lm_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_logits: bool = True,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Causal LM on `inputs_embeds` `[B, L, D]` with `attention_mask` `[B, L]` (or `[B, past + L]` with a cache)
        → (hidden `[B, L, D]` after the final norm, logits `[B, L, V]` or None, cache or None).

        Implemented once here on `run_decoder` + `compute_logits`; `return_logits=False` skips the vocabulary
        projection (robot batches do not need it). `attention_bias` `[B, 1, L, L]` (additive, 0 or the dtype's min)
        replaces the causal mask in attention while positions still follow `attention_mask` (the parallel action
        decoder's bidirectional action block); families with `custom_mask = False` refuse it."""
        if attention_bias is not None and not self.custom_mask:
            raise ValueError(f"backbone family {self.family!r} cannot run the LM with a custom 4-D attention mask")
        hidden, cache = self.run_decoder(inputs_embeds, attention_mask, past_key_values, use_cache, attention_bias)
        logits = self.compute_logits(hidden) if return_logits else None
        return hidden, logits, cache

    @abstractmethod
    def run_decoder(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Any,
        use_cache: bool,
        attention_bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The decoder stack under `lm_forward` → (hidden `[B, L, D]` after the final norm, cache or None)."""

    @abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[..., D]` → logits `[..., V]`, exactly as `lm_forward` makes them."""

    @abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder/vision layer activations in backward to save memory."""

    # --- loading and saving -------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        trust_remote_code: bool = False,
        torch_dtype: torch.dtype | str | None = None,
        device_map: str | dict | None = None,
        offload_folder: str | None = None,
    ) -> BackboneAdapter:
        """Load the adapter from a local folder or hub id (float32 unless `torch_dtype` says otherwise); a
        `device_map` places the weights over devices / CPU / disk (accelerate), for inference."""

    @abstractmethod
    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Save everything `from_pretrained(out_dir)` needs to restore this adapter."""
