"""Spatial keypoints: where, in the camera image, are the features the instruction asks about.

Why: a policy that must move to "the red block" needs the named object's *position*, and an action
token can only get it through attention from the LM's last position to the right image tokens, then
through position embeddings that a tiny or frozen vision tower never learned to make readable. A
spatial softmax (Levine et al. 2016; robomimic's and Diffusion Policy's image pooling) reads positions
out directly: each of K score maps is a softmax over the image-token grid, and its expected (x, y) in
[-1, 1] is a keypoint. Computed on the image tokens after FiLM (`model.film`), the maps depend on the
instruction, so the keypoints are "where the named thing is". Their 2K coordinates are projected to the
LM width and added to the action tokens' output states before the action head.

The projection is zero-initialised, so a fresh `SpatialKeypoints` leaves the policy unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vla_scale.model.token_grid import grid_side

TEMPERATURE = 20.0  # initial sharpness of the score maps


def keypoint_coordinates(scores: torch.Tensor, grid: int) -> torch.Tensor:
    """Scores `[B, N, K]` over a row-major `grid x grid` token grid (N = grid²) → expected (x, y) per map
    `[B, K, 2]` in [-1, 1] (x to the right, y down, as the image is stored)."""
    b, n, k = scores.shape
    if n != grid * grid:
        raise ValueError(f"{n} scores per map do not fill a {grid}x{grid} grid")
    weights = torch.softmax(scores.float(), dim=1)  # [B, N, K]
    axis = torch.linspace(-1.0, 1.0, grid, device=scores.device)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=-1)  # [N, 2]
    return torch.einsum("bnk,nc->bkc", weights, coords)


class SpatialKeypoints(nn.Module):
    """Image tokens `[B, N, D]` on a square grid → a keypoint summary `[B, D]` to add to the action states."""

    def __init__(self, hidden: int, num_keypoints: int):
        super().__init__()
        if num_keypoints < 1:
            raise ValueError(f"num_keypoints must be >= 1, got {num_keypoints}")
        self.num_keypoints = num_keypoints
        # Tokens are normalised and the scores sharpened by a learned temperature (initially TEMPERATURE): image
        # tokens of a random or frozen tower differ little from patch to patch, and a softmax over a few hundred
        # nearly equal scores is uniform, which puts every keypoint at the image centre with no gradient to
        # move it (measured: score ranges of 0.15-0.65 over 256 tokens after 500 steps without this).
        self.norm = nn.LayerNorm(hidden)
        self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, num_keypoints))
        self.log_temperature = nn.Parameter(torch.full((1,), math.log(TEMPERATURE)))  # 1-d: ZeRO broadcasts bytes
        self.proj = nn.Linear(2 * num_keypoints, hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def coordinates(self, tokens: torch.Tensor) -> torch.Tensor:
        """Keypoints `[B, K, 2]` of image tokens `[B, N, D]` (for inspection and tests)."""
        scores = self.score(self.norm(tokens)) * self.log_temperature.exp()
        return keypoint_coordinates(scores, grid_side(tokens.shape[1], "model.keypoints"))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Image tokens `[B, N, D]` → `[B, D]` in the tokens' dtype."""
        coords = self.coordinates(tokens).flatten(1)  # [B, 2K]
        return self.proj(coords.to(self.proj.weight.dtype)).to(tokens.dtype)
