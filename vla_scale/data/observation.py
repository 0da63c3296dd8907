"""What the policy sees at one decision: camera frames, optional wrist frames and state, and the instruction.

The model's inputs travel as one `Observation` instead of five loose tensors, so every entry point
(`RoboVLM.predict_action`, `predict_action_step`, `decode_action_ids`, the training paths) takes
the same thing in the same order. A training `Batch` carries one (`Batch.observation`) next to
its targets. Shapes follow the Batch contract (B = batch, T = window frames, L = text tokens):

| field        | dtype   | shape           | meaning                                              |
|--------------|---------|-----------------|------------------------------------------------------|
| images       | uint8   | [B, T, C, H, W] | static camera frames of the window, oldest first      |
| text_ids     | int64   | [B, L]          | instruction tokens, right-padded                      |
| text_mask    | bool    | [B, L]          | True on real tokens                                   |
| wrist_images | uint8   | [B, T, C, H, W] | wrist camera frames, or None (H, W may differ)        |
| state        | float32 | [B, T, S]       | normalised proprioceptive state per frame, or None    |

Shapes are checked on construction, so a wrong one fails where it is made, naming the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vla_scale.data.batch import Batch


@dataclass(frozen=True, eq=False)  # eq: tensors have no single truth value; compare fields instead
class Observation:
    """The model input of one decision (see the module docstring for shapes); immutable, checked on construction."""

    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    wrist_images: torch.Tensor | None = None
    state: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.dim() != 5:
            raise ValueError(f"Observation.images must be [B, T, C, H, W], got shape {tuple(self.images.shape)}")
        b, t = self.images.shape[:2]
        if self.text_ids.dim() != 2 or self.text_ids.shape[0] != b:
            raise ValueError(f"Observation.text_ids must be [B={b}, L], got shape {tuple(self.text_ids.shape)}")
        if self.text_mask.shape != self.text_ids.shape:
            raise ValueError(
                f"Observation.text_mask must match text_ids {tuple(self.text_ids.shape)}, "
                f"got shape {tuple(self.text_mask.shape)}"
            )
        if self.wrist_images is not None and (
            self.wrist_images.dim() != 5 or tuple(self.wrist_images.shape[:2]) != (b, t)
        ):
            raise ValueError(
                f"Observation.wrist_images must be [B={b}, T={t}, C, H, W] like images, "
                f"got shape {tuple(self.wrist_images.shape)}"
            )
        if self.state is not None and (self.state.dim() != 3 or tuple(self.state.shape[:2]) != (b, t)):
            raise ValueError(f"Observation.state must be [B={b}, T={t}, S], got shape {tuple(self.state.shape)}")

    @classmethod
    def from_batch(cls, batch: Batch) -> Observation:
        """The model inputs of a training batch (its targets and labels stay on the batch)."""
        return cls(batch.images, batch.text_ids, batch.text_mask, batch.wrist_images, batch.state)

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_frames(self) -> int:
        """T, the frames of the window."""
        return int(self.images.shape[1])

    def frames(self, start: int, stop: int) -> Observation:
        """Frames `start..stop-1` of every per-frame field (the instruction is shared by all frames)."""
        cut = [None if x is None else x[:, start:stop] for x in (self.images, self.wrist_images, self.state)]
        return Observation(cut[0], self.text_ids, self.text_mask, cut[1], cut[2])

    def to(self, device: torch.device | str) -> Observation:
        """Every tensor on `device` (non_blocking where pinned)."""
        moved = [
            None if x is None else x.to(device, non_blocking=True)
            for x in (self.images, self.text_ids, self.text_mask, self.wrist_images, self.state)
        ]
        return Observation(*moved)
