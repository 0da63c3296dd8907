"""Lists of windows or VL samples → one typed `Batch` (see `vla_scale.data.batch`).

Text is tokenised here, in the DataLoader workers, without special tokens: the model
adds BOS/EOS around the fused sequence itself. VL conversations are rendered as
`USER: ... ASSISTANT: ...<eos>` turns and only assistant turns (and their EOS) are
supervised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.format import VLSample
from vla_scale.data.window import Window, to_channels_first

IMAGE_PLACEHOLDER = "<image>"
_TOKEN_CACHE_SIZE = 4096


def _pad(rows: Sequence[list[int]], pad_id: int, fill: int | None = None) -> torch.Tensor:
    width = max(1, max(len(r) for r in rows))
    out = np.full((len(rows), width), pad_id if fill is None else fill, dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return torch.from_numpy(out)


def _stack(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """`np.stack`, minus its ~10 us of checks for the micro-batch-1 case (a fresh array either way)."""
    return arrays[0][None].copy() if len(arrays) == 1 else np.stack(arrays)


def _stack_images(arrays: Sequence[np.ndarray]) -> np.ndarray:
    """Stack uint8 `[..., H, W, C]` arrays; ones of another size are first resized to the batch's largest H and W.

    Sources differ in resolution (a VL set's images each have their own size; robot sets mixed in one
    batch may too). The backbone adapter resizes to its own square side anyway, so this only makes the
    batch rectangular; arrays already at the target size pass through untouched.
    """
    height = max(a.shape[-3] for a in arrays)
    width = max(a.shape[-2] for a in arrays)
    if all(a.shape[-3:-1] == (height, width) for a in arrays):
        return _stack(arrays)

    def fit(a: np.ndarray) -> np.ndarray:
        if a.shape[-3:-1] == (height, width):
            return a
        flat = a.reshape(-1, *a.shape[-3:])
        out = [np.asarray(Image.fromarray(img).resize((width, height), Image.BILINEAR)) for img in flat]
        return np.stack(out).reshape(*a.shape[:-3], height, width, a.shape[-1])

    return np.stack([fit(a) for a in arrays])


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def collate_robot(
    windows: Sequence[Window], tokenizer: Any, max_text_len: int, token_cache: dict[str, list[int]] | None = None
) -> Batch:
    """Robot windows (already normalised) → robot `Batch`.

    `token_cache` (instruction → ids, kept by the caller for one tokenizer): an episode's windows share
    its instruction, and tokenising it again costs more than decoding a small frame.
    """
    cache = {} if token_cache is None else token_cache
    ids = []
    for w in windows:
        if w.instruction not in cache:
            if len(cache) >= _TOKEN_CACHE_SIZE:  # bounded: datasets with a new instruction per episode exist
                cache.clear()
            cache[w.instruction] = _tokenize(tokenizer, w.instruction)
        ids.append(cache[w.instruction][:max_text_len])
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    text_ids = _pad(ids, pad_id)
    lengths = np.array([len(r) for r in ids])
    text_mask = torch.from_numpy(np.arange(text_ids.shape[1])[None, :] < lengths[:, None])
    has_wrist = all(w.wrist_images is not None for w in windows)
    return Batch(
        data_source="robot",
        images=torch.from_numpy(to_channels_first(_stack_images([w.images for w in windows]))),
        wrist_images=(
            torch.from_numpy(to_channels_first(_stack_images([w.wrist_images for w in windows]))) if has_wrist else None
        ),
        text_ids=text_ids,
        text_mask=text_mask,
        text_labels=torch.full_like(text_ids, IGNORE_INDEX),
        state=torch.from_numpy(_stack([w.state for w in windows])).float(),
        action=torch.from_numpy(_stack([w.action for w in windows])).float(),
        action_mask=torch.from_numpy(_stack([w.action_mask for w in windows])),
    )


def render_conversation(tokenizer: Any, conversations: list[dict], max_text_len: int) -> tuple[list[int], list[int]]:
    """LLaVA-style turns → token ids and labels (assistant turns supervised, truncated to max_text_len)."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    labels: list[int] = []
    for turn in conversations:
        role = turn.get("from", "")
        text = str(turn.get("value", "")).replace(IMAGE_PLACEHOLDER, "").strip()
        if role in ("human", "user"):
            part = _tokenize(tokenizer, f"USER: {text} ASSISTANT:")
            ids += part
            labels += [IGNORE_INDEX] * len(part)
        elif role in ("gpt", "assistant"):
            part = _tokenize(tokenizer, f" {text}") + ([eos] if eos is not None else [])
            ids += part
            labels += part
        else:
            raise ValueError(f"conversation turn with unknown role {role!r}; expected human/user or gpt/assistant")
    return ids[:max_text_len], labels[:max_text_len]


def collate_vl(samples: Sequence[VLSample], tokenizer: Any, max_text_len: int) -> Batch:
    """VL samples → VL `Batch` (images get T = 1)."""
    rendered = [render_conversation(tokenizer, s.conversations, max_text_len) for s in samples]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = [r[0] for r in rendered]
    images = _stack_images([s.image for s in samples])[:, None]
    return Batch(
        data_source="vl",
        images=torch.from_numpy(to_channels_first(images)),
        text_ids=_pad(ids, pad_id),
        text_mask=_pad([[1] * len(r) for r in ids], 0).bool(),
        text_labels=_pad([r[1] for r in rendered], IGNORE_INDEX, fill=IGNORE_INDEX),
    )
