"""Continuous action head: action-token hidden states → an action chunk (arm regression + gripper logits)."""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn


class MLPActionHead(nn.Module):
    """Pools the `latent_num` action-token states of one frame and regresses an `N`-step chunk.

    Arm dims are regressed directly (normalised units); the gripper is a binary open/close
    decision, so it gets a logit for BCE rather than a regression target.
    """

    def __init__(
        self,
        in_dim: int,
        action_dim: int,
        chunk_size: int,
        latent_num: int = 1,
        hidden_size: int = 256,
        pooling: Literal["mean", "flatten"] = "mean",
    ):
        super().__init__()
        if action_dim < 2:
            raise ValueError(f"action_dim must be >= 2 (arm dims then one gripper dim), got {action_dim}")
        if pooling not in ("mean", "flatten"):
            raise ValueError(f"pooling must be 'mean' or 'flatten', got {pooling!r}")
        self.action_dim = action_dim
        self.chunk_size = chunk_size
        self.latent_num = latent_num
        self.pooling = pooling
        pooled_dim = in_dim * latent_num if pooling == "flatten" else in_dim
        self.mlp = nn.Sequential(
            nn.Linear(pooled_dim, hidden_size),
            nn.GELU(),
            nn.Linear(hidden_size, hidden_size),
            nn.GELU(),
        )
        self.arm = nn.Linear(hidden_size, chunk_size * (action_dim - 1))
        self.gripper = nn.Linear(hidden_size, chunk_size)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[..., latent_num, D]` → (arm `[..., N, A-1]`, gripper logits `[..., N, 1]`); leading dims (batch,
        frames) pass through, each frame on its own."""
        if self.pooling == "mean":
            pooled = latents.mean(dim=-2)
        else:
            pooled = rearrange(latents, "... l d -> ... (l d)")
        h = self.mlp(pooled)
        arm = rearrange(self.arm(h), "... (n a) -> ... n a", n=self.chunk_size)
        gripper = rearrange(self.gripper(h), "... (n one) -> ... n one", one=1)
        return arm, gripper
