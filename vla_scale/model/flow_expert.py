"""The flow-matching action expert (π0-style): a small transformer that predicts the velocity of a noisy chunk.

Tokens: one per chunk step, `Linear(action dims) + learned step position + MLP(sinusoidal timestep)`. Each
block is pre-norm self-attention among the chunk steps (bidirectional), cross-attention to the VLM context
(the action-token states of the fused prefix, projected to the expert width), and an MLP. The output is the
velocity `[..., N, A]` over all action dims (binary gripper dims included; see `flow.py`).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """`[M]` times in [0, 1] → sin/cos features `[M, dim]` (π0's periods 4e-3..4, which suit t in [0, 1])."""
    if dim % 2:
        raise ValueError(f"the timestep embedding needs an even width, got {dim}")
    fraction = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float32)
    period = min_period * (max_period / min_period) ** fraction
    angle = t.float()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1)


class ExpertBlock(nn.Module):
    """Pre-norm self-attention over the chunk, cross-attention to the VLM context, MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_cross = nn.LayerNorm(width)
        self.cross_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h, h, need_weights=False)[0]
        x = x + self.cross_attn(self.norm_cross(x), context, context, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class FlowExpert(nn.Module):
    """Velocity model `v(x_t, t | context)` for `N`-step chunks of `action_dim` dims."""

    def __init__(
        self, context_dim: int, action_dim: int, chunk_size: int, width: int = 64, layers: int = 2, heads: int = 4
    ):
        super().__init__()
        if width % heads:
            raise ValueError(f"heads ({heads}) must divide width ({width})")
        self.width = width
        self.context_proj = nn.Linear(context_dim, width)
        self.action_in = nn.Linear(action_dim, width)
        self.position = nn.Parameter(torch.randn(chunk_size, width) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(ExpertBlock(width, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, action_dim)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """Noisy chunks `[M, N, A]`, times `[M]`, VLM states `[M, K, D]` → velocity `[M, N, A]` (the module's dtype)."""
        dtype = self.out.weight.dtype
        time = self.time_mlp(timestep_embedding(t, self.width).to(dtype))
        x = self.action_in(x_t.to(dtype)) + self.position.to(dtype) + time[:, None]
        ctx = self.context_proj(context.to(dtype))
        for block in self.blocks:
            x = block(x, ctx)
        return self.out(self.norm(x))
