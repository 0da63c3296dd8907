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

import os
from typing import Any

import torch
from torch import nn
from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3VisionConfig,
    LlamaConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones.base import BackboneAdapter, register_backbone
from vla_scale.model.backbones.kosmos2 import special_token_id
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer

FAKE_IMAGE, IMAGE, GLOBAL_IMAGE = "<fake_token_around_image>", "<image>", "<global-img>"
IDEFICS3_SPECIALS = {  # attribute names as SmolVLMProcessor reads them from the tokenizer
    "fake_image_token": FAKE_IMAGE,
    "image_token": IMAGE,
    "global_image_token": GLOBAL_IMAGE,
}


@register_backbone("idefics3")
class Idefics3Adapter(BackboneAdapter):
    """Idefics3: image tokens = `<global-img>` tag + pixel-shuffled, projected patch features; LM = inner Llama."""

    model_class: type[nn.Module] = Idefics3ForConditionalGeneration
    config_class: type = Idefics3Config
    vision_config_class: type = Idefics3VisionConfig
    image_processor_class: type = Idefics3ImageProcessorPil
    tiny_specials = {"pad": "<|finetune_right_pad_id|>", "bos": "<|begin_of_text|>", "eos": "<end_of_utterance>"}

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__(model, tokenizer, image_processor)
        fake = special_token_id(tokenizer, FAKE_IMAGE)
        self.image_start_id = self.image_end_id = fake
        self.global_image_id = special_token_id(tokenizer, GLOBAL_IMAGE)

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def image_seq_len(self) -> int:
        """Connector tokens per image: (side / patch / scale_factor)^2 (64 for SmolVLM-256M, 169 for Idefics3)."""
        side = self.image_size // int(self.model.config.vision_config.patch_size)
        return (side // int(self.model.config.scale_factor)) ** 2

    @property
    def tokens_per_image(self) -> int:
        """What `encode_images` returns per image: the connector tokens plus the `<global-img>` tag if present."""
        return self.image_seq_len + (self.global_image_id is not None)

    @property
    def vision_module(self) -> nn.Module:
        return self.model.model.vision_model

    @property
    def projector(self) -> nn.Module:
        return self.model.model.connector

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → `[B, tokens_per_image, D]`: `<global-img>` embedding, then the connector tokens."""
        vision_dtype = next(self.vision_module.parameters()).dtype
        pixels = self.preprocess_images(images).to(vision_dtype)
        patches = self.vision_module(pixel_values=pixels, return_dict=True).last_hidden_state
        features = self.projector(patches).to(self.embed_dtype)
        if self.global_image_id is None:
            return features
        tag = self.embed_tokens(torch.tensor([self.global_image_id], device=features.device))
        return torch.cat([tag.expand(features.shape[0], 1, -1).to(features.dtype), features], dim=1)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.text_model

    @classmethod
    def build_tiny(cls, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0) -> Idefics3Adapter:
        """Random-weight checkpoint of the real config classes (pixel shuffle by 2), saved for from_pretrained.

        The image processor is pinned to one `image_size` square without splitting, as robot frames are used.
        """
        scale = 2
        if tiny_cfg.image_size % (tiny_cfg.patch_size * scale):
            raise ValueError("model.backbone.tiny.image_size must be a multiple of 2 x patch_size (pixel shuffle)")
        if tiny_cfg.hidden_size % tiny_cfg.num_heads:
            raise ValueError("model.backbone.tiny.hidden_size must be a multiple of num_heads")
        tokenizer = build_tiny_tokenizer(**cls.tiny_specials, extra_special_tokens=IDEFICS3_SPECIALS)
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny_cfg.hidden_size,
            intermediate_size=tiny_cfg.intermediate_size,
            num_hidden_layers=tiny_cfg.num_layers,
            num_attention_heads=tiny_cfg.num_heads,
            num_key_value_heads=max(1, tiny_cfg.num_heads // 2),
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        vision = cls.vision_config_class(
            hidden_size=tiny_cfg.vision_hidden_size,
            intermediate_size=2 * tiny_cfg.vision_hidden_size,
            num_hidden_layers=tiny_cfg.vision_layers,
            num_attention_heads=tiny_cfg.vision_heads,
            image_size=tiny_cfg.image_size,
            patch_size=tiny_cfg.patch_size,
        )
        config = cls.config_class(
            text_config=text,
            vision_config=vision,
            image_token_id=tokenizer.convert_tokens_to_ids(IMAGE),
            scale_factor=scale,
            pad_token_id=tokenizer.pad_token_id,
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls.model_class(config).float()
        side = {"longest_edge": tiny_cfg.image_size}
        image_processor = cls.image_processor_class(do_image_splitting=False, size=side, max_image_size=side)
        adapter = cls(model.eval(), tokenizer, image_processor)
        adapter.save_pretrained(out_dir)
        return adapter


@register_backbone("smolvlm")
class SmolVLMAdapter(Idefics3Adapter):
    """SmolVLM: Idefics3's architecture with a smaller SigLIP and SmolLM2 (Llama) LM; the same adapter."""

    model_class = SmolVLMForConditionalGeneration
    config_class = SmolVLMConfig
    vision_config_class = SmolVLMVisionConfig
    image_processor_class = SmolVLMImageProcessorPil
    tiny_specials = {"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": "<end_of_utterance>"}
