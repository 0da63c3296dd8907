"""FiLM: the instruction modulates the image tokens before the language model sees them.

Why: a backbone whose vision tower has never been trained on language-conditioned tasks (a tiny
random one on CPU, or a frozen one) has to route "which object did the instruction name" through
attention from the action token to the right image token, a two-step lookup that is slow to learn from
demonstrations alone. Feature-wise linear modulation (Perez et al. 2018; RT-1's FiLM-EfficientNet)
lets the instruction scale and shift every image token's channels, so the token of the named object
can stand out in a direction that does not depend on which object was named. The projection is
zero-initialised: a fresh FiLM layer is the identity and a pretrained backbone starts unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from vla_scale.model.zero_sync import zero_touch


class InstructionFiLM(nn.Module):
    """`tokens * (1 + gamma(text)) + beta(text)` with gamma, beta from the mean instruction embedding."""

    def __init__(self, hidden: int):
        super().__init__()
        # Token embeddings are small at initialisation (std ~0.02) and the named object is one word of the
        # mean: normalising gives the projection an O(1) input, so it learns at the rate of the rest.
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, 2 * hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    @staticmethod
    def instruction_embedding(text_embeds: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean of the kept instruction token embeddings: `[B, L, D]`, `[B, L]` bool → `[B, D]` (0 if none)."""
        weights = keep.to(text_embeds.dtype).unsqueeze(-1)
        return (text_embeds * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)

    def forward(self, tokens: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
        """Image tokens `[B, N, D]` modulated by instruction embeddings `[B, D]`."""
        cond = self.norm(instruction.to(self.proj.weight.dtype))
        gamma, beta = self.proj(cond).to(tokens.dtype).chunk(2, dim=-1)
        return tokens * (1 + gamma.unsqueeze(1)) + beta.unsqueeze(1)

    def touch(self) -> torch.Tensor:
        """Zero term for batches without an instruction to condition on (VL samples): see `zero_sync`."""
        probe = torch.ones(1, self.proj.in_features, device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        return zero_touch(self.proj(self.norm(probe)))
