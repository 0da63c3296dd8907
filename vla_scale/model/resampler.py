"""Perceiver resampler: a fixed, small number of learned latents summarise one image's tokens.

A high-resolution tower yields hundreds of tokens per image, and with a window of frames and a
wrist camera the LM sequence grows with all of them. The resampler (Flamingo's Perceiver
resampler) lets `num_latents` learned queries cross-attend to an image's tokens, so each image
costs `num_latents` LM positions whatever the tower produces. Keys and values are the image
tokens and the latents themselves, so latents also exchange information with each other.

Shapes: image tokens `[B, N_img, D]` → latents `[B, num_latents, D]`, D = LM hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla_scale.config.schema import ResamplerConfig


class PerceiverAttention(nn.Module):
    """Latents (queries) attend over [image tokens; latents] (keys/values), pre-norm, multi-head."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, media: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """media `[B, N, D]`, latents `[B, K, D]` → update for the latents `[B, K, D]`."""
        media, latents = self.norm_media(media), self.norm_latents(latents)
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([media, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=self.heads) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class FeedForward(nn.Sequential):
    """Pre-norm MLP block of the resampler."""

    def __init__(self, dim: int, mult: int):
        super().__init__(
            nn.LayerNorm(dim),
            nn.Linear(dim, dim * mult, bias=False),
            nn.GELU(),
            nn.Linear(dim * mult, dim, bias=False),
        )


class PerceiverResampler(nn.Module):
    """`depth` blocks of (cross-attention, feed-forward) with residuals on the latents, then a final norm."""

    def __init__(
        self, dim: int, num_latents: int = 16, depth: int = 2, heads: int = 4, dim_head: int = 64, ff_mult: int = 4
    ):
        super().__init__()
        for name, value in [("num_latents", num_latents), ("depth", depth), ("heads", heads), ("dim_head", dim_head)]:
            if value < 1:
                raise ValueError(f"model.resampler.{name} must be >= 1, got {value}")
        self.num_latents = num_latents
        self.latents = nn.Parameter(torch.randn(num_latents, dim))
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, heads, dim_head), FeedForward(dim, ff_mult)]) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    @classmethod
    def from_config(cls, dim: int, cfg: ResamplerConfig) -> PerceiverResampler:
        return cls(dim, cfg.num_latents, cfg.depth, cfg.heads, cfg.dim_head, cfg.ff_mult)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """One image's tokens per row, `[B, N_img, D]` → `[B, num_latents, D]`."""
        if tokens.dim() != 3:
            raise ValueError(f"resampler input must be [B, N, D], got shape {tuple(tokens.shape)}")
        x = repeat(self.latents, "k d -> b k d", b=tokens.shape[0])
        for attn, ff in self.layers:
            x = x + attn(tokens, x)
            x = x + ff(x)
        return self.norm(x)
