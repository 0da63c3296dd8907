"""Parallel chunk decoding (OpenVLA-OFT style, `model.action_space: parallel`): the whole chunk in one LM pass.

The action slot of the fused sequence (see `sequence.py`) holds N = chunk_size positions, position n's input
the learned embedding `action_token[n]` (the state, with `model.use_state`, is the prefix's state token). The LM
runs once with a custom 4-D attention mask (`parallel_attention_bias`):

- prefix positions (everything that is not an action position) attend causally to the real prefix positions
  before them and never to an action position;
- action positions attend to the real prefix positions before their slot and to every position of their own
  slot, before or after them (bidirectional), but not to other frames' slots (history `pre`).

Each action position's final hidden state goes through one linear layer `action_head` (D → A, shared by the
positions, which differ by their embeddings) to chunk step n: the regressed ("arm") dims first, then G gripper
logits (the Batch contract). Training: L1 on the regressed dims, BCE on the grippers, over unmasked steps.
Prediction is the same single pass, no autoregression. Families whose LM cannot take a 4-D mask (Kosmos-2) are
refused by `validate_parallel`.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import Batch
from vla_scale.data.observation import Observation
from vla_scale.model.continuous import chunk_losses
from vla_scale.model.sequence import predicted_frames

if TYPE_CHECKING:
    from vla_scale.model.robovlm import RoboVLM


def build_parallel_modules(
    hidden: int, action_dim: int, chunk_size: int, dtype: torch.dtype
) -> tuple[nn.Parameter, nn.Linear]:
    """The learned position embeddings `[N, D]` (small normal: the LM's first norm dislikes zeros) and the linear
    layer D → A applied to each action position."""
    token = nn.Parameter((torch.randn(chunk_size, hidden) * 0.02).to(dtype))
    return token, nn.Linear(hidden, action_dim).to(dtype)


def parallel_allowed(attention_mask: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """Which key each query may attend to, bool `[B, L, L]` (query, key), from the fused sequence's real
    positions and action positions `[B, L]` (rules in the module docstring; each position also sees itself, so
    padding rows stay finite)."""
    length = attention_mask.shape[1]
    device = attention_mask.device
    real, action = attention_mask.bool(), action_mask.bool()
    starts = action & ~F.pad(action[:, :-1], (1, 0), value=False)
    slot = torch.cumsum(starts.long(), dim=1) * action  # 0 off the action positions, k in the k-th slot
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    same_slot = (slot[:, :, None] == slot[:, None, :]) & action[:, :, None]
    allowed = ((causal & ~action[:, None, :]) | same_slot) & real[:, None, :]
    return allowed | torch.eye(length, dtype=torch.bool, device=device)


def parallel_attention_bias(
    attention_mask: torch.Tensor, action_mask: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """`parallel_allowed` as the additive mask the decoders take: `[B, 1, L, L]`, 0 where allowed, else the
    dtype's minimum (what transformers' eager and SDPA attention both accept)."""
    allowed = parallel_allowed(attention_mask, action_mask)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min).unsqueeze(1)


class ParallelActions:
    """Losses and predictions of the parallel decoder; `model` is the RoboVLM holding `action_token` `[N, D]` and
    `action_head` (the linear layer)."""

    def __init__(self, cfg: ModelConfig, chunk_size: int, binary_dims: int = 1):
        self.cfg = cfg
        self.chunk_size = chunk_size
        self.binary_dims = binary_dims

    def states(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """Action positions' final hidden states `[B, T', N, D]` (T' = T, or 1 under `video`) from one LM pass, and
        the number of attended LM positions."""
        n = self.chunk_size
        # Lay out N placeholder slots, then put position n's embedding in slot n (row-major: row, frame, step).
        fused = model.robot_sequence(obs, n_action=n, action_token=model.action_token[0], append_eos=False)
        slots = int(fused.action_mask.sum()) // n
        values = repeat(model.action_token, "n d -> (s n) d", s=slots).to(fused.embeds.dtype)
        embeds = fused.embeds.masked_scatter(fused.action_mask.unsqueeze(-1), values)
        bias = parallel_attention_bias(fused.attention_mask, fused.action_mask, embeds.dtype)
        hidden, _, _ = model.adapter.lm_forward(embeds, fused.attention_mask, return_logits=False, attention_bias=bias)
        frames = predicted_frames(self.cfg.history_type, obs.num_frames)
        states = rearrange(hidden[fused.action_mask], "(b t n) d -> b t n d", b=obs.batch_size, t=frames, n=n)
        return states, fused.attention_mask.sum()

    def outputs(
        self, model: RoboVLM, obs: Observation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(arm `[B, T', N, A-G]`, gripper logits `[B, T', N, G]`, action states `[B*T', N, D]`, attended count)."""
        states, num_tokens = self.states(model, obs)
        out = model.action_head(states)
        regressed = out.shape[-1] - self.binary_dims
        return out[..., :regressed], out[..., regressed:], rearrange(states, "b t n d -> (b t) n d"), num_tokens

    def losses(self, model: RoboVLM, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, None]:
        """(loss terms, action states `[B*T', N, D]` for the CLIP regulariser, their mask: all). `loss_arm` is L1."""
        outputs = self.outputs(model, batch.observation)
        return chunk_losses(model, batch, outputs, self.cfg, self.binary_dims, partial(F.l1_loss, reduction="none"))

    def idle_outputs(self, model: RoboVLM) -> list[torch.Tensor]:
        """The position embeddings through the head, for `zero_touch` on batches that do not use them (VL)."""
        return [model.action_head(model.action_token)]

    def predict(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised regressed chunk `[B, T', N, A-G]`, gripper probabilities `[B, T', N, G]`), one pass."""
        arm, gripper, _, _ = self.outputs(model, obs)
        return arm.float(), torch.sigmoid(gripper.float())
