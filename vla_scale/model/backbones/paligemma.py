"""PaliGemma 1 and 2 (`transformers.PaliGemmaForConditionalGeneration`): SigLIP + linear projector + Gemma / Gemma2.

Real checkpoints: e.g. `google/paligemma-3b-pt-224` (Gemma) or `google/paligemma2-3b-pt-224`
(Gemma2). One adapter serves both: the text family is read from the loaded config
(`text_config.model_type`, see `text_family`), so family "paligemma" loads either. The
registered alias "paligemma2" differs only in its tiny checkpoint (a Gemma2 LM, `tiny_families`).

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

from typing import Any

import torch
from transformers import AutoConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration

from vla_scale.model.backbones.base import HFBackboneAdapter
from vla_scale.model.zero_sync import zero_touch


def force_causal(config: PaliGemmaConfig) -> PaliGemmaConfig:
    """Switch off PaliGemma's default bidirectional attention (see the module docstring), before the model is built."""
    config.text_config.use_bidirectional_attention = False
    return config


class PaliGemmaAdapter(HFBackboneAdapter):
    """PaliGemma: projected SigLIP patch features from `get_image_features`, LM = inner Gemma/Gemma2 (causal)."""

    family = "paligemma"
    model_class = PaliGemmaForConditionalGeneration

    @property
    def text_family(self) -> str:
        """`gemma` (PaliGemma 1) or `gemma2` (PaliGemma 2), read from the loaded text config."""
        return str(self.model.config.text_config.model_type)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → projected SigLIP features `[B, (S/P)^2, D]`, unscaled like PaliGemma's own merge."""
        pixels = self.tower_pixels(images)
        out = self.model.model.get_image_features(pixel_values=pixels, return_dict=True)
        features = out.pooler_output  # the projector's output; last_hidden_state is the tower's
        # A tower with a pooling head (vision_use_head; real PaliGemma has none) computes it unused:
        # zero_touch gives its parameters a zero gradient, not None.
        pooled = getattr(self.vision_module, "vision_model", self.vision_module)
        if getattr(pooled, "head", None) is not None:
            features = features + zero_touch(self.vision_module(pixels[:1]).pooler_output).to(features.dtype)
        return features.to(self.embed_dtype)

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor:
        """PaliGemma's 1-indexed positions (what its top-level forward uses; no `token_type_ids` needed)."""
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device) + past_length + 1
        return positions.unsqueeze(0)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head plus Gemma's final logit soft-capping, when the config has one."""
        logits = self.lm_head(hidden)
        cap = getattr(self.model.config.text_config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @classmethod
    def pretrained_config(cls, path_or_id: str, trust_remote_code: bool) -> Any:
        """The saved config (PaliGemma 1 or 2) with a causal LM."""
        return force_causal(AutoConfig.from_pretrained(path_or_id, trust_remote_code=trust_remote_code))


class PaliGemma2Adapter(PaliGemmaAdapter):
    """PaliGemma 2 (Gemma2 LM): the same adapter; only its tiny checkpoint differs (a Gemma2 text model)."""

    family = "paligemma2"
