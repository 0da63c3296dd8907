"""Proprioceptive state → one token in the LM's embedding space (design mechanism 5).

RoboVLMs carries this encoder but never wires it in; here it is inserted into the sequence
when `model.use_state` is on. The data path delivers the state's regressed dims (normalised) first and
its `binary_dims` binary dims (0/1, as the dataset declares; 0, 1 or more) last: the regressed ones go
through a linear layer, each binary one through an embedding of its own two values.
"""

from __future__ import annotations

import torch
from torch import nn


class StateEncoder(nn.Module):
    """`[..., S]` state → `[..., D]`: regressed dims through a linear layer, binary dims through embeddings, fused."""

    def __init__(self, state_dim: int, hidden_size: int, binary_dims: int = 1):
        super().__init__()
        if binary_dims < 0 or state_dim - binary_dims < 1:
            raise ValueError(
                f"state_dim {state_dim} with {binary_dims} binary dims leaves no regressed dimension; "
                "the state space needs at least one"
            )
        self.binary_dims = binary_dims
        self.arm = nn.Linear(state_dim - binary_dims, hidden_size)
        # Binary dim j's value v (0/1) is row 2j + v.
        self.gripper = nn.Embedding(2 * binary_dims, hidden_size) if binary_dims else None
        self.proj = nn.Linear((1 + binary_dims) * hidden_size, hidden_size)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        regressed = state.shape[-1] - self.binary_dims
        arm = self.arm(state[..., :regressed].to(self.arm.weight.dtype))
        if self.gripper is None:
            return self.proj(arm)
        rows = (state[..., regressed:] > 0.5).long() + 2 * torch.arange(self.binary_dims, device=state.device)
        gripper = self.gripper(rows).flatten(-2)  # [..., G * D]
        return self.proj(torch.cat([arm, gripper], dim=-1))
