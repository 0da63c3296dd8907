"""Kosmos-2 (`transformers.Kosmos2ForConditionalGeneration`): CLIP-style ViT + latent-query resampler + a
Magneto-style decoder with sinusoidal absolute positions.

Real checkpoint: `microsoft/kosmos-2-patch14-224`. Tiny checkpoints: the real config classes with random
weights, the offline BPE tokenizer with Kosmos-2's `<image>`/`</image>` tokens, and a CLIP image processor.

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

import os
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2TextConfig,
    Kosmos2VisionConfig,
)

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones.base import BackboneAdapter, register_backbone
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer

BOI, EOI = "<image>", "</image>"  # Kosmos2Processor's boi/eoi tokens


def _positions_in_embed_dtype(
    module: nn.Module, args: tuple, kwargs: dict[str, Any], output: torch.Tensor
) -> torch.Tensor:
    """Forward hook on the sinusoidal position module: cast its output to the dtype of `inputs_embeds`."""
    embeds = kwargs.get("inputs_embeds")
    return output if embeds is None else output.to(embeds.dtype)


def special_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of `token` if the tokenizer has it as one token (not unknown), else None."""
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or token_id == tokenizer.unk_token_id:
        return None
    return int(token_id)


@register_backbone("kosmos2")
class Kosmos2Adapter(BackboneAdapter):
    """Kosmos-2: image tokens = the resampler's `latent_query_num` outputs; LM = `text_model.model`."""

    model_class = Kosmos2ForConditionalGeneration

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__(model, tokenizer, image_processor)
        self.image_start_id = special_token_id(tokenizer, BOI)
        self.image_end_id = special_token_id(tokenizer, EOI)
        self.text_decoder.embed_positions.register_forward_hook(_positions_in_embed_dtype, with_kwargs=True)

    @property
    def text_decoder(self) -> nn.Module:
        """`Kosmos2TextTransformer`: embeddings (scale + positions), decoder blocks, final LayerNorm."""
        return self.model.text_model.model

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.embed_dim)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def tokens_per_image(self) -> int:
        return int(self.model.config.latent_query_num)

    @property
    def vision_module(self) -> nn.Module:
        return self.model.vision_model

    @property
    def projector(self) -> nn.Module:
        return self.model.image_to_text_projection

    @property
    def lm_head(self) -> nn.Module:
        return self.model.text_model.lm_head

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → resampler tokens `[B, latent_query_num, D]`, unscaled as Kosmos-2 merges them."""
        vision_dtype = next(self.vision_module.parameters()).dtype
        pixels = self.preprocess_images(images).to(vision_dtype)
        out = self.model.get_image_features(pixel_values=pixels, return_dict=True)
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

    @property
    def language_model(self) -> nn.Module:
        return self.text_decoder

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor:
        """Absolute positions derived from the attention mask, as HF derives them from `input_ids`."""
        return self.position_ids(attention_mask, inputs_embeds.shape[1], past_length)

    @classmethod
    def build_tiny(cls, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0) -> Kosmos2Adapter:
        """Random-weight Kosmos-2 of the real config classes, saved so `from_pretrained(out_dir)` loads it.

        The resampler keeps the real ratio of one latent query per 4 patches (256 → 64); the tokenizer has
        Kosmos-2's specials (`<s>`, `</s>`, `<pad>`, `<image>`, `</image>`) and prepends `<s>`.
        """
        if tiny_cfg.image_size % tiny_cfg.patch_size:
            raise ValueError("model.backbone.tiny.image_size must be a multiple of patch_size")
        if tiny_cfg.hidden_size % tiny_cfg.num_heads:
            raise ValueError("model.backbone.tiny.hidden_size must be a multiple of num_heads")
        tokenizer = build_tiny_tokenizer(
            pad="<pad>", bos="<s>", eos="</s>", extra_special_tokens={"boi_token": BOI, "eoi_token": EOI}
        )
        text = Kosmos2TextConfig(
            vocab_size=len(tokenizer),
            embed_dim=tiny_cfg.hidden_size,
            layers=tiny_cfg.num_layers,
            attention_heads=tiny_cfg.num_heads,
            ffn_dim=tiny_cfg.intermediate_size,
            max_position_embeddings=2048,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        vision = Kosmos2VisionConfig(
            hidden_size=tiny_cfg.vision_hidden_size,
            intermediate_size=2 * tiny_cfg.vision_hidden_size,
            num_hidden_layers=tiny_cfg.vision_layers,
            num_attention_heads=tiny_cfg.vision_heads,
            image_size=tiny_cfg.image_size,
            patch_size=tiny_cfg.patch_size,
        )
        n_patches = (tiny_cfg.image_size // tiny_cfg.patch_size) ** 2
        config = Kosmos2Config(
            text_config=text.to_dict(), vision_config=vision.to_dict(), latent_query_num=max(1, n_patches // 4)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Kosmos2ForConditionalGeneration(config).float()
        side = tiny_cfg.image_size
        image_processor = CLIPImageProcessorPil(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        adapter = cls(model.eval(), tokenizer, image_processor)
        adapter.save_pretrained(out_dir)
        return adapter
