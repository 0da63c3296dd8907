"""Idefics3 and SmolVLM (`Idefics3ForConditionalGeneration`, `SmolVLMForConditionalGeneration`): a SigLIP-style
ViT + a pixel-shuffle connector + a Llama LM.

Real checkpoints: e.g. `HuggingFaceM4/Idefics3-8B-Llama3` ("idefics3"), `HuggingFaceTB/SmolVLM-256M-Instruct`
or `HuggingFaceTB/SmolVLM-Instruct` ("smolvlm"). The two share one layout (`model.model.{vision_model,
connector, text_model}` + `model.lm_head`), so one adapter serves both; only the classes differ.

Family quirks (transformers 5.24, read from `models/idefics3` and `models/smolvlm`):
- Image tokens: the tower's patch features, pixel-shuffled by `scale_factor` (s x s neighbouring patches
  concatenated into one token) and projected by the connector's MLP: `(side / patch / s)^2` tokens.
  Robot frames are one fixed square image at the tower's `image_size`; the processor's image splitting
  (tiles + a downscaled global image) is not used.
- `get_image_features` takes `(B, n_images, 3, H, W)`, drops images that are exactly all zeros as batch
  padding and splits the result on a host-side count. `encode_images` calls the tower and the connector
  directly instead: every frame is real, and the shapes stay static (no host sync under ZeRO).
- Image start/end: the processor wraps a single (unsplit) image as
  `<fake_token_around_image><global-img><image> x N<fake_token_around_image>`. So `<fake_token_around_image>`
  is both `image_start_id` and `image_end_id`, and `encode_images` puts the `<global-img>` tag embedding
  in front of the N connector tokens (when the tokenizer has that tag), reproducing the layout the
  checkpoint was trained on. A wrist image inside the same pair gets its own `<global-img>` tag.
- The LM is a plain Llama (RoPE): `lm_forward` runs `model.model.text_model` on `inputs_embeds`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Idefics3ForConditionalGeneration, SmolVLMForConditionalGeneration

from vla_scale.model.backbones.base import HFBackboneAdapter, special_token_id

FAKE_IMAGE, IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<global-img>"
IDEFICS3_SPECIALS = {  # attribute names as SmolVLMProcessor reads them from the tokenizer
    "fake_image_token": FAKE_IMAGE,
    "image_token": IMAGE,
    "global_image_token": GLOBAL_IMAGE,
}


class Idefics3Adapter(HFBackboneAdapter):
    """Idefics3: image tokens = `<global-img>` tag + pixel-shuffled, projected patch features; LM = inner Llama."""

    family = "idefics3"
    model_class: type[nn.Module] = Idefics3ForConditionalGeneration
    language_model_path = "model.text_model"
    vision_path = "model.vision_model"
    projector_path = "model.connector"

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__(model, tokenizer, image_processor)
        fake = special_token_id(tokenizer, FAKE_IMAGE)
        self.image_start_id = self.image_end_id = fake
        self.global_image_id = special_token_id(tokenizer, GLOBAL_IMAGE)

    @property
    def image_seq_len(self) -> int:
        """Connector tokens per image: (side / patch / scale_factor)^2 (64 for SmolVLM-256M, 169 for Idefics3)."""
        side = self.image_size // int(self.model.config.vision_config.patch_size)
        return (side // int(self.model.config.scale_factor)) ** 2

    @property
    def tokens_per_image(self) -> int:
        """What `encode_images` returns per image: the connector tokens plus the `<global-img>` tag if present."""
        return self.image_seq_len + (self.global_image_id is not None)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → `[B, tokens_per_image, D]`: `<global-img>` embedding, then the connector tokens."""
        patches = self.vision_module(pixel_values=self.tower_pixels(images), return_dict=True).last_hidden_state
        features = self.projector(patches).to(self.embed_dtype)
        if self.global_image_id is None:
            return features
        tag = self.embed_tokens(torch.tensor([self.global_image_id], device=features.device))
        return torch.cat([tag.expand(features.shape[0], 1, -1).to(features.dtype), features], dim=1)


class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's architecture with a smaller SigLIP and SmolLM2 (Llama) LM; the same adapter."""

    family = "smolvlm"
    model_class = SmolVLMForConditionalGeneration
