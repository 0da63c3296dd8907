"""Qwen2-VL and Qwen2.5-VL: a native-resolution ViT with a 2x2 patch merger + a Qwen2 LM with multimodal RoPE.

Real checkpoints: e.g. `Qwen/Qwen2-VL-2B-Instruct` ("qwen2_vl"), `Qwen/Qwen2.5-VL-3B-Instruct` ("qwen2_5_vl").

Family quirks (transformers 5.24, read from `models/qwen2_vl` and `models/qwen2_5_vl`):
- Pixels go in as flattened patches `[sum(t*h*w), C*temporal_patch*patch*patch]` plus `image_grid_thw`;
  `patchify` reproduces the image processor's layout exactly (a still image is repeated over the
  temporal patch). Robot frames are resized to one fixed square side (`image_size`), so every image
  has the same grid and yields `(side / patch / merge)^2` tokens.
- Multimodal RoPE: each position has (t, h, w) ids. Text tokens count up on all three; an image's
  tokens get their grid coordinates offset by the position where the image starts, and the text after
  it resumes at that offset + max(h, w). The top-level forward derives this from `input_ids` +
  `mm_token_type_ids` (Qwen2-VL raises without them, Qwen2.5-VL silently falls back to 1D positions).
  We feed `inputs_embeds` straight to the inner LM, so `position_ids` finds the image spans in the
  fused sequence by the image start/end token embeddings RoboVLM wraps them in (as HF's own
  `get_placeholder_mask` does from embeddings), and calls the model's `get_rope_index` on that layout.
  Several images inside one start/end pair (e.g. a wrist camera) are alternately typed image/video so
  `get_rope_index` treats each as its own span; with a temporal grid of 1 a video span's positions are
  those of an image, so each image gets its own grid positions, back to back.
- With `model.resampler` on, an image is `num_latents` resampler latents with no grid: the
  adapter's `images_resampled` is set and image spans take consecutive 1D positions like text
  (what the top-level forward does for any non-image token), so no grid is pretended.
- KV-cache steps continue from the last prefix's `rope_deltas` (kept on the adapter, as the HF model
  keeps them on itself).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange, repeat
from torch import nn
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

from vla_scale.model.backbones.base import HFBackboneAdapter

DEFAULT_IMAGE_SIDE = 224  # robot frames: 224 px -> 16x16 patches of 14 -> 64 tokens after the 2x2 merge
QWEN_SPECIALS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}


class Qwen2VLAdapter(HFBackboneAdapter):
    """Qwen2-VL: merged ViT features from `get_image_features`, LM = inner Qwen2 with 3D (t, h, w) positions."""

    family = "qwen2_vl"
    model_class: type[nn.Module] = Qwen2VLForConditionalGeneration
    vision_path = "model.visual"
    projector_path = "model.visual.merger"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__(model, tokenizer, image_processor)
        self.image_start_id = int(model.config.vision_start_token_id)
        self.image_end_id = int(model.config.vision_end_token_id)
        vision = model.config.vision_config
        self.patch_size, self.merge_size = int(vision.patch_size), int(vision.spatial_merge_size)
        self.temporal_patch_size = int(vision.temporal_patch_size)
        self._rope_deltas: torch.Tensor | None = None  # [B, 1] from the last prefix, for KV-cache steps

    @property
    def image_size(self) -> int:
        """224 px (or the nearest side the processor's min/max pixel budget allows), a multiple of patch x merge."""
        factor = self.patch_size * self.merge_size
        size = self.image_processor.size
        min_pixels, max_pixels = size["shortest_edge"], size["longest_edge"]
        lo, hi = math.ceil(math.sqrt(min_pixels) / factor) * factor, math.floor(math.sqrt(max_pixels) / factor) * factor
        return min(max(round(DEFAULT_IMAGE_SIDE / factor) * factor, lo), hi)

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // (self.patch_size * self.merge_size)) ** 2

    # --- images -----------------------------------------------------------------------------------
    def patchify(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised `[B, C, S, S]` → (flat patches `[B*gh*gw, C*T*P*P]`, `image_grid_thw` `[B, 3]`), the processor's
        layout: merge windows contiguous, channels before the (repeated) temporal axis before the patch pixels."""
        m, p = self.merge_size, self.patch_size
        grid_h, grid_w = pixels.shape[-2] // p, pixels.shape[-1] // p
        x = rearrange(pixels, "b c (gh mh ph) (gw mw pw) -> b gh gw mh mw c ph pw", mh=m, mw=m, ph=p, pw=p)
        patches = repeat(x, "b gh gw mh mw c ph pw -> (b gh gw mh mw) (c t ph pw)", t=self.temporal_patch_size)
        grid = torch.tensor([1, grid_h, grid_w], device=pixels.device).expand(pixels.shape[0], 3)
        return patches, grid

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → merged patch features `[B, tokens_per_image, D]` in the LM embedding space."""
        patches, grid = self.patchify(self.tower_pixels(images))
        out = self.model.model.get_image_features(patches, grid, return_dict=True)
        return torch.stack(list(out.pooler_output)).to(self.embed_dtype)

    # --- language model ---------------------------------------------------------------------------
    def _special_mask(self, inputs_embeds: torch.Tensor, token_id: int) -> torch.Tensor:
        emb = self.embed_tokens(torch.tensor(token_id, device=inputs_embeds.device)).to(inputs_embeds.dtype)
        return (inputs_embeds == emb).all(dim=-1)

    def position_ids(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """3D RoPE ids `[3, B, L]` for a fused sequence: image tokens (between image start/end embeddings) get grid
        positions, text continues after them, padding gets 0 — what the top-level forward computes from input_ids."""
        mask = attention_mask.bool()
        starts = self._special_mask(inputs_embeds, self.image_start_id) & mask
        ends = self._special_mask(inputs_embeds, self.image_end_id) & mask
        inside = ((starts.long().cumsum(1) - ends.long().cumsum(1)) > 0) & ~starts & mask
        if self.images_resampled:  # latents, not a patch grid: 1D positions like text (see module docstring)
            inside = torch.zeros_like(inside)
        n = self.tokens_per_image
        offset = inside.long().cumsum(1) - 1  # index among this row's image tokens
        if (inside.sum(1) % n).any():
            raise ValueError(f"image spans must hold whole images of {n} tokens, got {inside.sum(1).tolist()}")
        # Image k of a row gets type 1 (image) or 2 (video) alternately: adjacent images stay separate spans.
        types = torch.where(inside, 1 + (offset // n) % 2, 0)
        side = self.image_size // self.patch_size
        grid = torch.tensor([[1, side, side]], device=inputs_embeds.device)
        n_image, n_video = int((types == 1).sum()) // n, int((types == 2).sum()) // n
        positions, deltas = self.model.model.get_rope_index(
            torch.zeros_like(types),  # only its shape is read; the layout comes from the types
            mm_token_type_ids=types.int(),
            image_grid_thw=grid.expand(n_image, 3) if n_image else None,
            video_grid_thw=grid.expand(n_video, 3) if n_video else None,
            attention_mask=mask.long(),
        )
        self._rope_deltas = deltas
        return positions

    def _cached_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past: int
    ) -> torch.Tensor:
        """Positions of tokens appended after a cached prefix: real tokens so far + the prefix's rope delta."""
        b, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if attention_mask.shape[1] == past + length:  # the full mask: count the prefix's real tokens per row
            seen = attention_mask[:, :past].long().sum(1, keepdim=True)
        else:
            seen = torch.full((b, 1), past, dtype=torch.long, device=device)
        deltas = self._rope_deltas if self._rope_deltas is not None else torch.zeros(b, 1, dtype=torch.long)
        pos = torch.arange(length, device=device) + seen + deltas.to(device).view(-1, 1)
        return repeat(pos, "b l -> three b l", three=3)

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor:
        """Explicit multimodal RoPE positions: from the fused layout for a prefix, continued for cached steps."""
        if past_length:
            return self._cached_position_ids(inputs_embeds, attention_mask, past_length)
        return self.position_ids(inputs_embeds, attention_mask)


class Qwen25VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: the same interface; its ViT uses windowed attention with a few full-attention blocks."""

    family = "qwen2_5_vl"
    model_class = Qwen2_5_VLForConditionalGeneration
