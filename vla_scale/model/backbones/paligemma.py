"""PaliGemma 1 and 2 (`transformers.PaliGemmaForConditionalGeneration`): SigLIP + linear projector + Gemma / Gemma2.

Real checkpoints: e.g. `google/paligemma-3b-pt-224` (Gemma) or `google/paligemma2-3b-pt-224`
(Gemma2). One adapter serves both: the text family is read from the loaded config
(`text_config.model_type`, see `text_family`), so family "paligemma" loads either. The
registered alias "paligemma2" differs only in what `build_tiny` writes (a Gemma2 LM).

Family quirks (transformers 5.24, read from `models/paligemma` and `models/gemma*`):
- Embedding scale. Gemma multiplies token embeddings by sqrt(hidden). In 5.x that happens
  inside the embedding module (`GemmaTextScaledWordEmbedding`), not in the LM forward, so
  `embed_tokens` returns scaled text embeddings and `inputs_embeds` goes into the decoder as
  given. PaliGemma's own forward scatters the projected image features into those embeddings
  unscaled (4.x divided them by sqrt(hidden) and the LM multiplied everything back: the same
  net effect). So image features enter raw and text enters scaled, exactly as here; our
  learnable action/state tokens are, like image features, free vectors in the LM input space.
- Causality. `PaliGemmaConfig` sets `text_config.use_bidirectional_attention=True`, which makes
  Gemma's attention non-causal whenever the mask builder skips the mask (an all-ones mask
  under SDPA): the LM silently becomes bidirectional. PaliGemma's prefix-LM mask needs
  `token_type_ids` our fused sequence does not have, and our losses (next-token VL, action
  tokens after the text) and the KV cache assume a causal LM, so we force it off.
- Positions are 1-indexed in PaliGemma's forward; `lm_forward` passes the same ids.
- Gemma2 caps final logits (`final_logit_softcapping`); applied after `lm_head` as PaliGemma does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import (
    AutoConfig,
    Gemma2Config,
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones.base import (
    ConditionalGenerationAdapter,
    load_processors,
    register_backbone,
    resolve_dtype,
)
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer

TEXT_FAMILIES = {"gemma": GemmaConfig, "gemma2": Gemma2Config}  # PaliGemma 1 and PaliGemma 2


def force_causal(config: PaliGemmaConfig) -> PaliGemmaConfig:
    """Switch off PaliGemma's default bidirectional attention (see the module docstring), before the model is built."""
    config.text_config.use_bidirectional_attention = False
    return config


@register_backbone("paligemma")
class PaliGemmaAdapter(ConditionalGenerationAdapter):
    """PaliGemma: projected SigLIP patch features from `get_image_features`, LM = inner Gemma/Gemma2 (causal)."""

    tiny_text_family = "gemma"  # what `build_tiny` writes; loading reads the family from the checkpoint

    @property
    def text_family(self) -> str:
        """`gemma` (PaliGemma 1) or `gemma2` (PaliGemma 2), read from the loaded text config."""
        return str(self.model.config.text_config.model_type)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → projected SigLIP features `[B, (S/P)^2, D]`, unscaled like PaliGemma's own merge."""
        vision_dtype = next(self.vision_module.parameters()).dtype
        pixels = self.preprocess_images(images).to(vision_dtype)
        out = self.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        features = out.pooler_output  # the projector's output; last_hidden_state is the tower's
        # A tower with a pooling head (vision_use_head; real PaliGemma has none) computes it unused:
        # touch it with 0 x one element so ZeRO sees a zero gradient, not None, for its parameters.
        pooled = getattr(self.vision_module, "vision_model", self.vision_module)
        if getattr(pooled, "head", None) is not None:
            features = features + self.vision_module(pixels[:1]).pooler_output.reshape(-1)[0] * 0.0
        return features.to(self.embed_dtype)

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor:
        """PaliGemma's 1-indexed positions (what its top-level forward uses; no `token_type_ids` needed)."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length + 1
        return positions.unsqueeze(0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head plus Gemma's final logit soft-capping, when the config has one."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.model.config.text_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @classmethod
    def from_pretrained(
        cls, path_or_id: str, trust_remote_code: bool = False, torch_dtype: torch.dtype | str | None = None
    ) -> PaliGemmaAdapter:
        """Load a PaliGemma 1 or 2 checkpoint (local folder or hub id) with a causal LM; float32 unless told."""
        config = force_causal(AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code))
        model = PaliGemmaForConditionalGeneration.from_pretrained(
            path_or_id, config=config, dtype=resolve_dtype(torch_dtype)
        )
        tokenizer, image_processor = load_processors(path_or_id, trust_remote_code)
        return cls(model, tokenizer, image_processor)

    @classmethod
    def build_tiny(cls, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0) -> PaliGemmaAdapter:
        """SigLIP (no pooling head, like the real one) + Gemma or Gemma2 with random weights, saved for from_pretrained.

        Real PaliGemma's tokenizer prepends `<bos>` and appends nothing; so does the tiny one.
        """
        tokenizer = build_tiny_tokenizer(pad="<pad>", bos="<bos>", eos="<eos>")
        if tiny_cfg.image_size % tiny_cfg.patch_size:
            raise ValueError("model.backbone.tiny.image_size must be a multiple of patch_size")
        if tiny_cfg.hidden_size % tiny_cfg.num_heads:
            raise ValueError("model.backbone.tiny.hidden_size must be a multiple of num_heads")
        vision = SiglipVisionConfig(
            hidden_size=tiny_cfg.vision_hidden_size,
            intermediate_size=2 * tiny_cfg.vision_hidden_size,
            num_hidden_layers=tiny_cfg.vision_layers,
            num_attention_heads=tiny_cfg.vision_heads,
            image_size=tiny_cfg.image_size,
            patch_size=tiny_cfg.patch_size,
            vision_use_head=False,
        )
        head_dim = tiny_cfg.hidden_size // tiny_cfg.num_heads
        text_kwargs: dict[str, Any] = {}
        if cls.tiny_text_family == "gemma2":  # Gemma2 scales queries by this instead of head_dim (default 256)
            text_kwargs["query_pre_attn_scalar"] = head_dim
        text = TEXT_FAMILIES[cls.tiny_text_family](
            vocab_size=len(tokenizer),
            hidden_size=tiny_cfg.hidden_size,
            intermediate_size=tiny_cfg.intermediate_size,
            num_hidden_layers=tiny_cfg.num_layers,
            num_attention_heads=tiny_cfg.num_heads,
            num_key_value_heads=1,  # multi-query attention, as in the real 2B/3B Gemma
            head_dim=head_dim,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            **text_kwargs,
        )
        config = force_causal(
            PaliGemmaConfig(
                vision_config=vision,
                text_config=text,
                image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
                vocab_size=len(tokenizer),
                projection_dim=tiny_cfg.hidden_size,
                hidden_size=tiny_cfg.hidden_size,
            )
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = PaliGemmaForConditionalGeneration(config).float()
        size = {"height": tiny_cfg.image_size, "width": tiny_cfg.image_size}
        image_processor = SiglipImageProcessorPil(size=size)
        adapter = cls(model.eval(), tokenizer, image_processor)
        adapter.save_pretrained(out_dir)
        return adapter


@register_backbone("paligemma2")
class PaliGemma2Adapter(PaliGemmaAdapter):
    """PaliGemma 2 (Gemma2 LM): the same adapter; only `build_tiny` differs, writing a Gemma2 text model."""

    tiny_text_family = "gemma2"
