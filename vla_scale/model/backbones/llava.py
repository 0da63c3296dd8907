"""LLaVA family (`transformers.LlavaForConditionalGeneration`): CLIP or SigLIP vision tower + projector + Llama LM.

Real checkpoints: e.g. `llava-hf/llava-1.5-7b-hf`. The layout is the shared adapter's default; only image
encoding differs. Tiny checkpoints (SigLIP + Llama): `tiny_families.tiny_llava`.
"""

from __future__ import annotations

import torch
from transformers import LlavaForConditionalGeneration

from vla_scale.model.backbones.base import HFBackboneAdapter
from vla_scale.model.zero_sync import zero_touch


class LlavaAdapter(HFBackboneAdapter):
    """LLaVA: image features from `get_image_features` (vision tower layer + projector), LM = inner Llama."""

    family = "llava"
    model_class = LlavaForConditionalGeneration

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → projected patch features `[B, N, D]` (config's feature layer and select strategy)."""
        pixels = self.tower_pixels(images)
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
        # none of which reach the LM: zero_touch gives those parameters a zero gradient instead of None.
        tails = [t for t in [getattr(out, "last_hidden_state", None), *pooled] if torch.is_tensor(t)]
        if tails:
            features = features + zero_touch(*tails).to(features.dtype)
        return features.to(self.embed_dtype)
