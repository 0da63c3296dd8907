"""Proprioceptive state → one token in the LM's embedding space (design mechanism 5).

RoboVLMs carries this encoder but never wires it in; here it is inserted into the sequence
when `model.use_state` is on. The last state dimension is the gripper (binary, as the data
path delivers it); the others are the arm's normalised pose.
"""

from __future__ import annotations

import torch
from torch import nn


class StateEncoder(nn.Module):
    """`[..., S]` state → `[..., D]`: arm dims through a linear layer, gripper through an embedding, fused."""

    def __init__(self, state_dim: int, hidden_size: int):
        super().__init__()
        if state_dim < 2:
            raise ValueError(f"state_dim must be >= 2 (arm dims then one gripper dim), got {state_dim}")
        self.arm = nn.Linear(state_dim - 1, hidden_size)
        self.gripper = nn.Embedding(2, hidden_size)
        self.proj = nn.Linear(2 * hidden_size, hidden_size)

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        arm = self.arm(state[..., :-1].to(self.arm.weight.dtype))
        gripper = self.gripper((state[..., -1] > 0.5).long())
        return self.proj(torch.cat([arm, gripper], dim=-1))
