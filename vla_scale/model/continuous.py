"""The continuous action path: learned action tokens, an action head on their output states, regression losses.

`latent_num` copies of one learned `action_token` fill each action slot of the fused sequence
(see `sequence.py`); their LM output states `[B, T', latent_num, D]` go through the action head
(`mlp`, or a history head `lstm` / `gpt` that fuses the window's frames causally) to a normalised
chunk of the regressed ("arm") dims `[B, T', N, A-G]` and logits of the G binary grippers `[B, T', N, G]`
(G from the dataset's declared action space; 0, 1 or more). Training: MSE or Huber on the regressed dims,
BCE on the grippers (`loss_gripper` / `acc_gripper` only when G > 0), over unmasked chunk steps only.

The parameters (`action_token`, `action_head`) live on `RoboVLM` under those names, so checkpoints
and the training stages' parameter groups keep their names; `ContinuousActions` holds only the
config and takes the model in each call.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla_scale.config.schema import LossWeightsConfig, ModelConfig
from vla_scale.data.batch import Batch
from vla_scale.data.observation import Observation
from vla_scale.model.history_heads import HistoryHead, build_action_head
from vla_scale.model.sequence import chunk_targets, predicted_frames
from vla_scale.model.zero_sync import zero_touch

if TYPE_CHECKING:
    from vla_scale.model.robovlm import RoboVLM


def build_continuous_modules(
    cfg: ModelConfig, hidden: int, action_dim: int, chunk_size: int, dtype: torch.dtype, binary_dims: int = 1
) -> tuple[nn.Parameter, nn.Module]:
    """The learned action token `[D]` and the action head (maps `[B, T, latent_num, D]` to `[B, T, N, ...]`)."""
    # Small normal, not zeros: the LM's first RMSNorm has a huge gradient at the zero vector.
    token = nn.Parameter((torch.randn(hidden) * 0.02).to(dtype))
    head = build_action_head(cfg.head, hidden, action_dim, chunk_size, cfg.latent_num, binary_dims).to(dtype)
    return token, head


def chunk_losses(
    model: RoboVLM,
    batch: Batch,
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: ModelConfig,
    binary_dims: int,
    arm_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> tuple[dict[str, torch.Tensor], torch.Tensor, None]:
    """A chunk-regressing head's `losses` from its `outputs` (arm, gripper, action states, attended count):
    `chunk_loss_terms` against the batch's targets, plus `num_tokens`; (terms, action states, their mask: all)."""
    arm, gripper, action_hidden, num_tokens = outputs
    action, mask = chunk_targets(batch, cfg.history_type)
    out = chunk_loss_terms(arm, gripper, action, mask, cfg.loss_weights, binary_dims, arm_error)
    # lm_head is idle on robot batches of a chunk-regressing head: keep it in the graph with one token (zero_sync).
    out["loss"] = out["loss"] + zero_touch(model.adapter.lm_head(action_hidden[:1, :1]))
    out["num_tokens"] = num_tokens
    return out, action_hidden, None


def chunk_loss_terms(
    arm: torch.Tensor,
    gripper: torch.Tensor,
    action: torch.Tensor,
    mask: torch.Tensor,
    weights: LossWeightsConfig,
    binary_dims: int,
    arm_error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Loss terms of a predicted chunk: `arm_error` (elementwise, e.g. MSE, Huber or L1) on the regressed dims,
    BCE on the binary grippers (`loss_gripper` / `acc_gripper` only when `binary_dims` > 0), over unmasked chunk
    steps only, and their weighted sum `loss`.

    arm `[..., N, A-G]`, gripper logits `[..., N, G]`, targets `[..., N, A]` (the batch contract: regressed dims
    first, then the binary ones), mask `[..., N]`.
    """
    # Zero the targets of masked steps first so NaN/inf padding cannot leak into loss or gradients.
    target = torch.where(mask.unsqueeze(-1), action.float(), 0.0)
    count = mask.sum().clamp(min=1)
    regressed = arm.shape[-1]
    arm_err = arm_error(arm.float(), target[..., :regressed])
    loss_arm = torch.where(mask, arm_err.mean(dim=-1), 0.0).sum() / count
    out = {"loss": weights.arm * loss_arm, "loss_arm": loss_arm}
    if binary_dims:  # no gripper terms for a space without a binary gripper
        grip_logit, grip_target = gripper.float(), target[..., regressed:]
        bce = F.binary_cross_entropy_with_logits(grip_logit, grip_target, reduction="none").mean(dim=-1)
        out["loss_gripper"] = torch.where(mask, bce, 0.0).sum() / count
        correct = ((grip_logit > 0) == (grip_target > 0.5)).float().mean(dim=-1)
        out["acc_gripper"] = torch.where(mask, correct, 0.0).sum().detach() / count
        out["loss"] = out["loss"] + weights.gripper * out["loss_gripper"]
    return out


class ContinuousActions:
    """Losses and predictions of the continuous path; `model` is the RoboVLM holding the parameters."""

    def __init__(self, cfg: ModelConfig, binary_dims: int = 1):
        self.cfg = cfg
        self.latent_num = cfg.latent_num
        self.binary_dims = binary_dims

    def latents(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned action tokens' output states `[B, T', latent_num, D]` (T' = T, or 1 under `video`) and the
        number of attended LM positions."""
        fused, keypoints = model.robot_sequence_and_keypoints(
            obs, n_action=self.latent_num, action_token=model.action_token, append_eos=True
        )
        hidden, _, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        frames = predicted_frames(self.cfg.history_type, obs.num_frames)
        # Action positions in row-major order: sample, then frame (its own row, or its slot in the row), then token.
        pattern = "(b t n) d -> b t n d"
        latents = rearrange(hidden[fused.action_mask], pattern, b=obs.batch_size, t=frames, n=self.latent_num)
        if keypoints is not None:  # [B, T, D]: the predicted frames' keypoints, added to each of their tokens
            latents = latents + keypoints[:, -frames:].unsqueeze(2).to(latents.dtype)
        return latents, fused.attention_mask.sum()

    def outputs(
        self, model: RoboVLM, obs: Observation
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head outputs → (arm `[B, T', N, A-G]`, gripper logits `[B, T', N, G]`, action-token hidden states
        `[B*T', latent_num, D]`, number of attended LM positions). A history head (lstm / gpt) runs over the
        given window from a fresh state."""
        latents, num_tokens = self.latents(model, obs)
        arm, gripper = model.action_head(latents)
        return arm, gripper, rearrange(latents, "b t n d -> (b t) n d"), num_tokens

    def losses(self, model: RoboVLM, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, None]:
        """(loss terms, action-token states `[B*T', latent_num, D]` for the CLIP regulariser, their mask: all)."""
        outputs = self.outputs(model, batch.observation)
        if self.cfg.head.arm_loss == "huber":
            arm_error = partial(F.huber_loss, reduction="none", delta=1.0)
        else:
            arm_error = partial(F.mse_loss, reduction="none")
        return chunk_losses(model, batch, outputs, self.cfg, self.binary_dims, arm_error)

    def idle_outputs(self, model: RoboVLM) -> list[torch.Tensor]:
        """Outputs of the action token and head on batches that do not use them (VL), for `zero_touch`."""
        arm, gripper = model.action_head(repeat(model.action_token, "d -> 1 1 n d", n=self.latent_num))
        return [arm, gripper]

    def predict(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised regressed chunk `[B, T', N, A-G]`, gripper probabilities `[B, T', N, G]`) over the window."""
        arm, gripper, _, _ = self.outputs(model, obs)
        return arm.float(), torch.sigmoid(gripper.float())

    def predict_step(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """One frame `[B, 1, ...]` through a history head's memory → (arm `[B, 1, N, A-G]`, gripper probabilities)."""
        head = model.action_head
        if not isinstance(head, HistoryHead):
            raise ValueError(f"stepwise prediction needs a history head (lstm / gpt), not {type(head).__name__}")
        if obs.num_frames != 1:
            raise ValueError(
                f"predict_action_step takes one frame [B, 1, C, H, W], got shape {tuple(obs.images.shape)}"
            )
        latents, _ = self.latents(model, obs)
        arm, gripper = head.step(latents[:, 0])
        return arm[:, None].float(), torch.sigmoid(gripper[:, None].float())
