"""Image tokens as a square grid: its side, and k x k average pooling of it.

Most VLM vision towers (CLIP and SigLIP without a class token, the LLaVA/PaliGemma projectors) hand
the language model one token per image patch, row-major. Options that use the layout (spatial
keypoints, `model.image_pool`) need that grid; backbones whose image tokens are not one (a class
token, Idefics3's pixel shuffle plus tags, a resampler's latents) get a clear error instead.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange


def grid_side(num_tokens: int, option: str) -> int:
    """The side of the square token grid, or an error naming `option` (the config key that needs it)."""
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(
            f"{option} needs each camera image as a square grid of tokens, but the backbone gives {num_tokens} "
            f"tokens per image (a class token, tags, pooling or a resampler): turn {option} off for this backbone, "
            "or model.resampler off"
        )
    return side


def pool_grid(tokens: torch.Tensor, k: int, option: str = "model.image_pool") -> torch.Tensor:
    """Average-pool image tokens `[B, N, D]` (N = s², row-major) over k x k cells → `[B, (s/k)², D]`.

    Why: the language model's cost grows with the image-token count, while spatial readouts want a fine
    grid; pooling lets the vision tower (and `model.keypoints`) keep the fine grid and the LM see fewer tokens
    (as LLaVA-NeXT's video pooling and Qwen2-VL's patch merger do).
    """
    if k == 1:
        return tokens
    side = grid_side(tokens.shape[1], option)
    if side % k:
        raise ValueError(f"{option}={k} must divide the {side}x{side} image-token grid")
    grid = rearrange(tokens, "b (h w) d -> b d h w", h=side)
    return rearrange(F.avg_pool2d(grid, k), "b d h w -> b (h w) d")
