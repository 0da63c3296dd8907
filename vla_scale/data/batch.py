"""The batch contract between the data stream and the model: names and shapes, in one place.

B = batch, T = window (frames of history), N = action chunk length
(`fwd_pred_next_n`), A = action dims, S = state dims, L = text tokens, C/H/W = image channels/height/width.

Action and state dims come in the order of the dataset's declared spaces (`vla_scale.data.spaces`), reordered
by the normaliser: first the regressed dims (normalised: mean/std, min/max or q01/q99), then the G binary
gripper dims as 0/1 targets (G = 0, 1 or more; the legacy layout is A-1 regressed + 1 binary). The model is
built with (A, G) and (S, G_state) from the same declaration; `Normalizer.unnormalize_action` restores the
dataset's order and units.

| field          | dtype   | shape            | robot batch                         | VL batch                   |
|----------------|---------|------------------|-------------------------------------|----------------------------|
| data_source    | str     | -                | "robot"                             | "vl"                       |
| images         | uint8   | [B, T, C, H, W]  | static camera frames of the window  | the image, T = 1           |
| wrist_images   | uint8   | [B, T, C, H, W]  | wrist camera if the dataset has one | None                       |
| text_ids       | int64   | [B, L]           | instruction tokens (right-padded)   | conversation tokens        |
| text_mask      | bool    | [B, L]           | True on real tokens                 | True on real tokens        |
| text_labels    | int64   | [B, L]           | all -100                            | assistant-turn ids, else -100 |
| state          | float32 | [B, T, S]        | state per frame: regressed, binary  | None                       |
| action         | float32 | [B, T, N, A]     | regressed dims, then binary in {0,1} | None                      |
| action_mask    | bool    | [B, T, N]        | False past the episode end          | None                       |

Images stay uint8 until the model: the backbone adapter resizes and normalises them
the way its vision tower expects, so the data path knows nothing of the model.
The model-input fields (images, text, wrist images, state) travel into the model as one
`Observation` (`batch.observation`); the rest are targets and bookkeeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

import torch

from vla_scale.data.observation import Observation

IGNORE_INDEX = -100


@dataclass
class Batch:
    data_source: Literal["robot", "vl"]
    images: torch.Tensor
    text_ids: torch.Tensor
    text_mask: torch.Tensor
    text_labels: torch.Tensor
    wrist_images: torch.Tensor | None = None
    state: torch.Tensor | None = None
    action: torch.Tensor | None = None
    action_mask: torch.Tensor | None = None
    # Loader bookkeeping, not model input: source name, worker id, cumulative skip counts.
    meta: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.images.shape[0])

    @property
    def observation(self) -> Observation:
        """The model inputs (images, instruction, wrist images, state), shape-checked; targets stay here."""
        return Observation.from_batch(self)

    def to(self, device: torch.device | str) -> Batch:
        """Move every tensor to `device` (non_blocking where pinned)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            moved[f.name] = value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
        return Batch(**moved)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader when `pin_memory=True`."""
        pinned = {}
        for f in fields(self):
            value = getattr(self, f.name)
            pinned[f.name] = value.pin_memory() if isinstance(value, torch.Tensor) else value
        return Batch(**pinned)
