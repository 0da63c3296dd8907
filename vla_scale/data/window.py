"""Cut an episode into training windows with chunked future actions.

A window of `window_size` frames starting at t holds frames t..t+W-1; frame j gets
the action chunk `action[j : j + N]`. Chunks that run past the episode end are
zero-padded and masked out with `action_mask`, so the last frames of an episode
still train the steps they do have.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from einops import rearrange

from vla_scale.data.format import Episode


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


def iter_windows(
    ep: Episode, window_size: int, chunk: int, static_camera: str, wrist_camera: str | None
) -> Iterator[Window]:
    """All windows of an episode, in order; episodes shorter than the window yield nothing."""
    if static_camera not in ep.frames:
        raise KeyError(f"episode {ep.key} has no camera {static_camera!r} (has {sorted(ep.frames)})")
    frames = np.stack(ep.frames[static_camera])
    wrist = np.stack(ep.frames[wrist_camera]) if wrist_camera and wrist_camera in ep.frames else None
    chunks, mask = chunk_actions(ep.action, chunk)
    for start in range(ep.length - window_size + 1):
        sl = slice(start, start + window_size)
        yield Window(
            key=f"{ep.key}/{start}",
            instruction=ep.instruction,
            images=frames[sl],
            wrist_images=None if wrist is None else wrist[sl],
            state=ep.state[sl],
            action=chunks[sl],
            action_mask=mask[sl],
        )


def to_channels_first(images: np.ndarray) -> np.ndarray:
    """uint8 `[..., H, W, C]` → `[..., C, H, W]`."""
    return rearrange(images, "... h w c -> ... c h w")
