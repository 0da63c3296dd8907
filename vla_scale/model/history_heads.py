"""History-aware action heads (`history_type: post`): fuse the window's per-frame action features over time.

The VLM sees one frame per sequence; each frame's `latent_num` action-token states are mean-pooled into
one feature, and a causal LSTM or a causal transformer ("gpt") runs over the window's features, so
frame t's chunk depends on frames <= t only. The same weights run step by step at inference with
per-episode memory (`step` / `reset`): stepping through frames from a reset gives what the windowed
forward gives for those frames. The memory covers `max_history` frames, the training window: after
that the head runs over the last `max_history` frames only, exactly like a training window ending at
the current frame (RoboVLMs does the same for its LSTM decoder).
"""

from __future__ import annotations

from collections import deque

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vla_scale.config.schema import ActionHeadConfig
from vla_scale.model.action_head import MLPActionHead, check_action_dims, chunk_outputs


class HistoryHead(nn.Module):
    """Shared parts: pool + project per frame, a causal time model (subclass), chunk outputs, the frame memory."""

    def __init__(
        self, in_dim: int, action_dim: int, chunk_size: int, hidden_size: int, max_history: int, binary_dims: int = 1
    ):
        super().__init__()
        check_action_dims(action_dim, binary_dims)
        if max_history < 1:
            raise ValueError(
                f"model.head.max_history must be >= 1 for a history head, got {max_history} "
                "(load_config sets 0 to data.window_size; set it when building ModelConfig by hand)"
            )
        self.chunk_size = chunk_size
        self.max_history = max_history
        self.proj = nn.Linear(in_dim, hidden_size)
        self.arm = nn.Linear(hidden_size, chunk_size * (action_dim - binary_dims))
        self.gripper = nn.Linear(hidden_size, chunk_size * binary_dims) if binary_dims else None
        self._frames: deque[torch.Tensor] = deque(maxlen=max_history)  # projected features [B, H], not weights
        # Recompute the time model's activations in backward (set with the backbone's gradient checkpointing).
        self.gradient_checkpointing = False

    def _recompute(self) -> bool:
        return self.gradient_checkpointing and self.training and torch.is_grad_enabled()

    def _time(self, x: torch.Tensor) -> torch.Tensor:
        """Causal fusion over time: `[B, T, H]` → `[B, T, H]`, output t from inputs <= t."""
        raise NotImplementedError

    def _time_step(self, x: torch.Tensor) -> torch.Tensor:
        """One new frame `[B, H]` → its fused output `[B, H]`, using and updating the memory."""
        raise NotImplementedError

    def _outputs(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return chunk_outputs(h, self.arm, self.gripper, self.chunk_size)

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training / windowed: `[B, T, latent_num, D]` → (arm `[B, T, N, A-G]`, gripper logits `[B, T, N, G]`)."""
        if latents.dim() != 4:
            raise ValueError(f"a history head takes [B, T, latent_num, D], got shape {tuple(latents.shape)}")
        if latents.shape[1] > self.max_history:
            raise ValueError(
                f"window of {latents.shape[1]} frames exceeds model.head.max_history={self.max_history}; "
                "it must equal data.window_size"
            )
        return self._outputs(self._time(self.proj(latents.mean(dim=2))))

    def step(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference, one frame: `[B, latent_num, D]` → (arm `[B, N, A-G]`, gripper logits `[B, N, G]`)."""
        if self._frames and self._frames[-1].shape[0] != latents.shape[0]:
            raise ValueError("batch size changed within an episode; call reset() between episodes")
        return self._outputs(self._time_step(self.proj(latents.mean(dim=1))))

    def reset(self) -> None:
        """Forget the episode: the next `step` is the first frame of a window."""
        self._frames.clear()


class LSTMHistoryHead(HistoryHead):
    """A stacked LSTM over frames; at inference it carries its hidden state while the episode fits the window."""

    def __init__(self, in_dim: int, action_dim: int, chunk_size: int, cfg: ActionHeadConfig, binary_dims: int = 1):
        super().__init__(in_dim, action_dim, chunk_size, cfg.hidden_size, cfg.max_history, binary_dims)
        self.rnn = nn.LSTM(cfg.hidden_size, cfg.hidden_size, num_layers=cfg.num_layers, batch_first=True)
        self._state: tuple[torch.Tensor, torch.Tensor] | None = None

    def _time(self, x: torch.Tensor) -> torch.Tensor:
        if self._recompute():
            return checkpoint(lambda inp: self.rnn(inp)[0], x, use_reentrant=False)
        return self.rnn(x)[0]

    def _time_step(self, x: torch.Tensor) -> torch.Tensor:
        full = len(self._frames) == self.max_history
        self._frames.append(x)  # drops the oldest frame once full
        if full:  # past the window: rerun over the last max_history frames from a fresh state, like training
            out, self._state = self.rnn(torch.stack(list(self._frames), dim=1))
        else:
            out, self._state = self.rnn(x[:, None], self._state)
        return out[:, -1]

    def reset(self) -> None:
        super().reset()
        self._state = None


class GPTHistoryHead(HistoryHead):
    """A small causal transformer over frames with learned frame positions; at inference it reruns over a
    rolling buffer of the last `max_history` frame features (positions 0.. as in a training window)."""

    def __init__(self, in_dim: int, action_dim: int, chunk_size: int, cfg: ActionHeadConfig, binary_dims: int = 1):
        super().__init__(in_dim, action_dim, chunk_size, cfg.hidden_size, cfg.max_history, binary_dims)
        h = cfg.hidden_size
        self.pos = nn.Parameter(torch.randn(cfg.max_history, h) * 0.02)
        layer = nn.TransformerEncoderLayer(
            h, cfg.num_heads, 4 * h, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        # No dropout: training and stepwise inference then compute the same function.
        self.blocks = nn.TransformerEncoder(layer, cfg.num_layers, norm=nn.LayerNorm(h), enable_nested_tensor=False)

    def _time(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        future = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)  # True = may not attend
        h = x + self.pos[:t]
        for layer in self.blocks.layers:
            if self._recompute():
                h = checkpoint(layer, h, future, None, True, use_reentrant=False)
            else:
                h = layer(h, src_mask=future, is_causal=True)
        return self.blocks.norm(h)

    def _time_step(self, x: torch.Tensor) -> torch.Tensor:
        self._frames.append(x)
        return self._time(torch.stack(list(self._frames), dim=1))[:, -1]


def build_action_head(
    cfg: ActionHeadConfig, in_dim: int, action_dim: int, chunk_size: int, latent_num: int, binary_dims: int = 1
) -> nn.Module:
    """`model.head.type` → the head module; every head maps `[B, T, latent_num, D]` to `[B, T, N, ...]` chunks
    (`binary_dims` of the `action_dim` dims get gripper logits, the rest are regressed)."""
    if cfg.type == "mlp":
        return MLPActionHead(
            in_dim, action_dim, chunk_size, latent_num=latent_num, hidden_size=cfg.hidden_size, binary_dims=binary_dims
        )
    if cfg.type == "lstm":
        return LSTMHistoryHead(in_dim, action_dim, chunk_size, cfg, binary_dims)
    if cfg.type == "gpt":
        return GPTHistoryHead(in_dim, action_dim, chunk_size, cfg, binary_dims)
    raise ValueError(f"model.head.type={cfg.type!r}; use 'mlp', 'lstm' or 'gpt'")
