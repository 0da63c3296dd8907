"""Continuous action head: action-token hidden states → an action chunk (regressed dims + binary gripper logits)."""

from __future__ import annotations

from typing import Literal

import torch
from einops import rearrange
from torch import nn


class MLPActionHead(nn.Module):
    """Pools the `latent_num` action-token states of one frame and regresses an `N`-step chunk.

    Regressed ("arm") dims are predicted directly (normalised units); each of the `binary_dims` binary
    grippers is an open/close decision, so it gets a logit for BCE rather than a regression target. With
    `binary_dims=0` there is no gripper layer and the gripper output is an empty `[..., N, 0]`.
    """

    def __init__(
        self,
        in_dim: int,
        action_dim: int,
        chunk_size: int,
        latent_num: int = 1,
        hidden_size: int = 256,
        pooling: Literal["mean", "flatten"] = "mean",
        binary_dims: int = 1,
    ):
        super().__init__()
        check_action_dims(action_dim, binary_dims)
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
        self.binary_dims = binary_dims
        self.arm = nn.Linear(hidden_size, chunk_size * (action_dim - binary_dims))
        self.gripper = nn.Linear(hidden_size, chunk_size * binary_dims) if binary_dims else None

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`[..., latent_num, D]` → (arm `[..., N, A-G]`, gripper logits `[..., N, G]`); leading dims (batch,
        frames) pass through, each frame on its own."""
        if self.pooling == "mean":
            pooled = latents.mean(dim=-2)
        else:
            pooled = rearrange(latents, "... l d -> ... (l d)")
        return chunk_outputs(self.mlp(pooled), self.arm, self.gripper, self.chunk_size)


def check_action_dims(action_dim: int, binary_dims: int) -> None:
    """At least one regressed dimension; binary ones (0, 1 or more) come from the dataset's declared space."""
    if binary_dims < 0 or action_dim - binary_dims < 1:
        raise ValueError(
            f"action_dim {action_dim} with {binary_dims} binary gripper dims leaves no regressed dimension; "
            "the action space needs at least one regressed dimension"
        )


def chunk_outputs(
    h: torch.Tensor, arm: nn.Linear, gripper: nn.Linear | None, chunk_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features `[..., H]` → (regressed chunk `[..., N, A-G]`, gripper logits `[..., N, G]`, empty when G = 0)."""
    out = rearrange(arm(h), "... (n a) -> ... n a", n=chunk_size)
    if gripper is None:
        return out, out.new_zeros(*out.shape[:-1], 0)
    return out, rearrange(gripper(h), "... (n g) -> ... n g", n=chunk_size)
