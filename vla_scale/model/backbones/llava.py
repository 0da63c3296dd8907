"""LLaVA family (`transformers.LlavaForConditionalGeneration`): CLIP or SigLIP vision tower + projector + Llama LM.

Real checkpoints: e.g. `llava-hf/llava-1.5-7b-hf`. Tiny checkpoints: SigLIP vision +
Llama text from their real config classes, random weights, a byte-level BPE tokenizer
trained offline on a built-in tabletop-robot corpus, and a SigLIP image processor.
"""

from __future__ import annotations

import os

import torch
from transformers import (
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones.base import (
    ConditionalGenerationAdapter,
    register_backbone,
)
from vla_scale.model.backbones.tiny_tokenizer import IMAGE, build_tiny_tokenizer


@register_backbone("llava")
class LlavaAdapter(ConditionalGenerationAdapter):
    """LLaVA: image features from `get_image_features` (vision tower layer + projector), LM = inner Llama."""

    model_class = LlavaForConditionalGeneration

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → projected patch features `[B, N, D]` (config's feature layer and select strategy)."""
        vision_dtype = next(self.vision_module.parameters()).dtype
        pixels = self.preprocess_images(images).to(vision_dtype)
        # get_image_features overwrites the tower's pooled output with the projected features;
        # keep the original so the zero-touch below reaches the pooling layers too.
        pooled: list[torch.Tensor] = []
        hook = self.vision_module.register_forward_hook(lambda _m, _a, out: pooled.append(out.pooler_output))
        try:
            out = self.model.model.get_image_features(
                pixel_values=pixels,
                vision_feature_select_strategy=self.model.config.vision_feature_select_strategy,
                return_dict=True,
            )
        finally:
            hook.remove()
        # transformers 5.x: a BaseModelOutputWithPooling whose pooler_output is a list of [N, D] per image;
        # older versions returned the tensor itself.
        features = out if torch.is_tensor(out) else out.pooler_output
        if isinstance(features, (list, tuple)):
            features = torch.stack(list(features))
        # The tower computes layers past `vision_feature_layer`, its final norm and (SigLIP) pooling head,
        # none of which reach the LM. Adding 0 x one element of their outputs gives those parameters
        # a zero gradient instead of None, so every rank's ZeRO gradient set is the same. Costs nothing.
        tails = [t for t in [getattr(out, "last_hidden_state", None), *pooled] if torch.is_tensor(t)]
        if tails:
            features = features + sum(t.reshape(-1)[0].float() for t in tails).to(features.dtype) * 0.0
        return features.to(self.embed_dtype)

    @classmethod
    def build_tiny(cls, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0) -> LlavaAdapter:
        """SigLIP + Llama LLaVA with random weights, saved so `from_pretrained(out_dir)` loads it like a real one."""
        tokenizer = build_tiny_tokenizer()
        if tiny_cfg.image_size % tiny_cfg.patch_size:
            raise ValueError("model.backbone.tiny.image_size must be a multiple of patch_size")
        vision = SiglipVisionConfig(
            hidden_size=tiny_cfg.vision_hidden_size,
            intermediate_size=2 * tiny_cfg.vision_hidden_size,
            num_hidden_layers=tiny_cfg.vision_layers,
            num_attention_heads=tiny_cfg.vision_heads,
            image_size=tiny_cfg.image_size,
            patch_size=tiny_cfg.patch_size,
        )
        text = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=tiny_cfg.hidden_size,
            intermediate_size=tiny_cfg.intermediate_size,
            num_hidden_layers=tiny_cfg.num_layers,
            num_attention_heads=tiny_cfg.num_heads,
            num_key_value_heads=tiny_cfg.num_heads,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        config = LlavaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
            image_seq_length=(tiny_cfg.image_size // tiny_cfg.patch_size) ** 2,
            vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config).float()
        # The PIL variant needs no torchvision; it saves as "SiglipImageProcessor", so either backend loads it.
        size = {"height": tiny_cfg.image_size, "width": tiny_cfg.image_size}
        image_processor = SiglipImageProcessorPil(size=size)
        adapter = cls(model.eval(), tokenizer, image_processor)
        adapter.save_pretrained(out_dir)
        return adapter
