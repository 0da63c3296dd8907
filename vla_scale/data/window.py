"""Cut an episode into training windows with chunked future actions.

A window of `window_size` frames starting at t holds frames t..t+W-1; frame j gets
the action chunk `action[j : j + N]`. Chunks that run past the episode end are
zero-padded and masked out with `action_mask`, so the last frames of an episode
still train the steps they do have.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Window:
    key: str  # "<episode key>/<start frame>"
    instruction: str
    images: np.ndarray  # uint8 [T, H, W, 3]
    wrist_images: np.ndarray | None  # uint8 [T, H, W, 3]
    state: np.ndarray  # float32 [T, S]
    action: np.ndarray  # float32 [T, N, A]
    action_mask: np.ndarray  # bool [T, N]


def chunk_actions(action: np.ndarray, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """`[L, A]` → chunks `[L, N, A]` and mask `[L, N]` (False past the end)."""
    length, dim = action.shape
    padded = np.concatenate([action, np.zeros((chunk - 1, dim), action.dtype)], axis=0)
    idx = np.arange(length)[:, None] + np.arange(chunk)[None, :]
    return padded[idx], idx < length


def to_channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, C]` → `[..., C, H, W]`."""
    n = images.ndim  # a view, as einops' rearrange gave, without its (or np.moveaxis's) call overhead
    return images.transpose(*range(n - 3), n - 1, n - 3, n - 2)
