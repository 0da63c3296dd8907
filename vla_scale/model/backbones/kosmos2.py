"""Kosmos-2 (`transformers.Kosmos2ForConditionalGeneration`): CLIP-style ViT + latent-query resampler + a
Magneto-style decoder with sinusoidal absolute positions.

Real checkpoint: `microsoft/kosmos-2-patch14-224`. Tiny checkpoints: `tiny_families.tiny_kosmos2` (the real
config classes with random weights, Kosmos-2's `<image>`/`</image>` tokens, a CLIP image processor).

Family quirks (transformers 5.24, read from `models/kosmos2`):
- Layout: `model.vision_model` (tower), `model.image_to_text_projection` (dense + cross-attention of
  `latent_query_num` learned queries over the patch features: the image tokens), `model.text_model`
  (a `Kosmos2TextForCausalLM`; its `.model` is the decoder, `.lm_head` is tied to the token embedding).
  The top-level forward always wants pixels, so the LM runs through `text_model.model` on `inputs_embeds`.
- The processor lays a prompt out as `<s> <image> [64 image slots] </image> text`, the same order as
  RoboVLM's fusion, so `<image>`/`</image>` are the image start/end ids.
- Embedding scale: the decoder multiplies `inputs_embeds` by sqrt(D) itself, after the image features are
  written in; so text embeddings and image features both go in unscaled, exactly as `embed_tokens` and
  `encode_images` return them.
- Positions are absolute (sinusoidal), counted over real tokens from `padding_idx + 1`, padding gets the
  zero row `padding_idx`. From `inputs_embeds` alone HF counts every slot, padding included; `lm_forward`
  derives them from the attention mask instead, so a left-padded decoding prompt gets the same positions
  as the unpadded one (rotary families do not care; this one does).
- bf16 under DeepSpeed: DeepSpeed 0.19 casts parameters only and keeps floating buffers in fp32. The
  sinusoidal table is such a buffer, so `bf16 embeds + fp32 positions` promoted the decoder's hidden
  states to fp32 and the first bf16 LayerNorm failed on CPU with "mixed dtype (CPU): expect parameter to
  have scalar type of Float" (fp32 runs never saw it; a bf16 load makes the table bf16 too). A forward
  hook returns the positions in the dtype of the embeddings they are added to, so the decoder runs in
  bf16 whoever cast the model; the table itself stays in fp32 (rounding its rows or its output is the same).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Kosmos2ForConditionalGeneration

from vla_scale.model.backbones.base import HFBackboneAdapter, special_token_id

BOI, EOI = "<image>", "</image>"  # Kosmos2Processor's boi/eoi tokens


def _positions_in_embed_dtype(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    """Forward hook on the sinusoidal position module: cast its output to the dtype of `inputs_embeds`."""
    embeds = kwargs.get("inputs_embeds")
    return output if embeds is None else output.to(embeds.dtype)


class Kosmos2Adapter(HFBackboneAdapter):
    """Kosmos-2: image tokens = the resampler's `latent_query_num` outputs; LM = `text_model.model`."""

    family = "kosmos2"
    custom_mask = False  # its text transformer expands a 2-D mask itself (no 4-D pass-through)
    model_class = Kosmos2ForConditionalGeneration
    language_model_path = "text_model.model"
    vision_path = "vision_model"
    projector_path = "image_to_text_projection"
    lm_head_path = "text_model.lm_head"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__(model, tokenizer, image_processor)
        self.image_start_id = special_token_id(tokenizer, BOI)
        self.image_end_id = special_token_id(tokenizer, EOI)
        self.text_decoder.embed_positions.register_forward_hook(_positions_in_embed_dtype, with_kwargs=True)

    @property
    def text_decoder(self) -> nn.Module:
        """`Kosmos2TextTransformer`: embeddings (scale + positions), decoder blocks, final LayerNorm."""
        return self.language_model

    @property
    def tokens_per_image(self) -> int:
        return int(self.model.config.latent_query_num)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → resampler tokens `[B, latent_query_num, D]`, unscaled as Kosmos-2 merges them."""
        out = self.model.get_image_features(pixel_values=self.tower_pixels(images), return_dict=True)
        return out.pooler_output.to(self.embed_dtype)

    def position_ids(self, attention_mask: torch.Tensor, length: int, past: int) -> torch.Tensor:
        """Sinusoidal position ids `[B, length]` of the last `length` slots: `padding_idx` + running count of real
        tokens, `padding_idx` on padding (what HF computes from `input_ids`, here from the mask)."""
        pad = int(self.text_decoder.embed_positions.padding_idx)
        mask = attention_mask.long()
        if mask.shape[1] != past + length:  # a mask of the new slots only: the cached prefix had no padding
            mask = torch.cat([mask.new_ones(mask.shape[0], past), mask], dim=1)
        count = mask.cumsum(dim=1) * mask
        return count[:, -length:] + pad

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor:
        """Absolute positions derived from the attention mask, as HF derives them from `input_ids`."""
        return self.position_ids(attention_mask, inputs_embeds.shape[1], past_length)
