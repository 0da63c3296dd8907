"""Greedy autoregressive decoding of discrete action ids, with the adapter's KV cache (and a reference without).

Only the reserved action ids `[lo, hi)` compete at each step (other logits are masked out),
so the decoded sequence always maps back to bins. Prompts come compacted from `RoboVLM.fuse`
(padding at the end); they are left-aligned first, so every row's generated tokens follow its
own last real token. Adapters with plain RoPE positions see a row's positions shifted by its
padding, which rotary attention does not notice (it depends on relative positions only).
"""

from __future__ import annotations

import torch

from vla_scale.model.backbones.base import BackboneAdapter


def left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the front (stable: real positions keep their order)."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # False (padding) sorts first
    return torch.take_along_dim(embeds, order.unsqueeze(-1), dim=1), torch.take_along_dim(mask, order, dim=1)


def _pick(adapter: BackboneAdapter, last_hidden: torch.Tensor, id_range: tuple[int, int]) -> torch.Tensor:
    """Argmax over the action ids only: `[B, D]` → ids `[B]`."""
    lo, hi = id_range
    logits = adapter.compute_logits(last_hidden).float()
    return logits[:, lo:hi].argmax(dim=-1) + lo


def _embed(adapter: BackboneAdapter, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return adapter.embed_tokens(ids).to(like.dtype)


def greedy_decode(
    adapter: BackboneAdapter, embeds: torch.Tensor, mask: torch.Tensor, n_tokens: int, id_range: tuple[int, int]
) -> torch.Tensor:
    """Prompt `[B, L, D]` + mask `[B, L]` → `n_tokens` greedy ids `[B, n_tokens]`: one pass over the prompt that
    fills the KV cache, then one token per step, feeding the embedding of the id just chosen."""
    embeds, mask = left_align(embeds, mask.bool())
    hidden, _, cache = adapter.lm_forward(embeds, mask, use_cache=True, return_logits=False)
    if cache is None:
        raise RuntimeError("the backbone returned no KV cache; call predict_action under model.eval()")
    ids = [_pick(adapter, hidden[:, -1], id_range)]
    ones = torch.ones_like(mask[:, :1])
    for _ in range(n_tokens - 1):
        mask = torch.cat([mask, ones], dim=1)
        step = _embed(adapter, ids[-1][:, None], embeds)
        hidden, _, cache = adapter.lm_forward(step, mask, past_key_values=cache, use_cache=True, return_logits=False)
        ids.append(_pick(adapter, hidden[:, -1], id_range))
    return torch.stack(ids, dim=1)


def greedy_decode_uncached(
    adapter: BackboneAdapter, embeds: torch.Tensor, mask: torch.Tensor, n_tokens: int, id_range: tuple[int, int]
) -> torch.Tensor:
    """Reference for `greedy_decode`: the whole sequence re-run at every step (quadratic; tests only)."""
    embeds, mask = left_align(embeds, mask.bool())
    ids = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
    for _ in range(n_tokens):
        seq = torch.cat([embeds, _embed(adapter, ids, embeds)], dim=1)
        seq_mask = torch.cat([mask, torch.ones_like(ids, dtype=torch.bool)], dim=1)
        hidden, _, _ = adapter.lm_forward(seq, seq_mask, return_logits=False)
        ids = torch.cat([ids, _pick(adapter, hidden[:, -1], id_range)[:, None]], dim=1)
    return ids
