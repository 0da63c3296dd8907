"""CLIP-feature regulariser: action-token states are pulled toward the CLIP text embedding of the instruction.

On a robot batch, the hidden states at the action positions (learned action tokens, or the
discrete action ids) are mean-pooled per sample over tokens and frames, projected by a trainable
linear layer to CLIP's embedding width, and compared with the frozen CLIP text model's
`text_embeds` of the instruction (cosine or smooth-L1). This ties what the policy acts on to the
language it was told, an extra loss `loss_clip` weighted by `model.loss_weights.clip`.

Where the text comes from: the Batch carries the instruction only as ids in the backbone's
tokenizer, so the regulariser decodes them back to strings and re-tokenizes with CLIP's tokenizer.
Collate tokenizes instructions without special tokens, and decoding skips specials, so the string
is the instruction itself (up to whitespace, which CLIP's tokenizer normalises anyway); the data
path stays free of model knowledge. The price is one host copy of the ids per robot batch.

The CLIP text model is a teacher, never trained: `ClipTextTeacher` is a plain object, not an
`nn.Module` attribute of the policy, so its weights are not parameters (no optimizer state, no
gradients), not in the state dict (not checkpointed or exported), and not partitioned by ZeRO-3.
It is moved to the device of the first batch it sees. Only `ClipRegularizer.proj` trains.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import reduce
from torch import nn
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModelWithProjection

from vla_scale.compat import hf_zero3_init_disabled
from vla_scale.config.schema import ClipRegConfig, TinyClipConfig
from vla_scale.model.backbones.base import write_folder_once
from vla_scale.model.backbones.tiny import text_config_kwargs
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer
from vla_scale.model.zero_sync import zero_touch

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


class ClipTextTeacher:
    """Frozen CLIP text model with projection + its tokenizer: instruction strings → `text_embeds` `[B, E]`."""

    def __init__(self, model: CLIPTextModelWithProjection, tokenizer: Any):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = int(model.config.max_position_embeddings)

    @property
    def embed_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @classmethod
    def from_pretrained(cls, path_or_id: str) -> ClipTextTeacher:
        """Load from a local folder or hub id (a full CLIP checkpoint works too: only the text side is read)."""
        # The teacher is outside the engine (whose hooks gather partitioned weights): load it whole.
        with hf_zero3_init_disabled():
            model = CLIPTextModelWithProjection.from_pretrained(path_or_id, dtype=torch.float32)
        return cls(model, AutoTokenizer.from_pretrained(path_or_id))

    @torch.no_grad()
    def embed(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Instruction strings → float32 CLIP text embeddings `[B, E]` on `device` (truncated to CLIP's 77 tokens)."""
        if next(self.model.parameters()).device != device:
            self.model.to(device)
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        out = self.model(input_ids=tok["input_ids"].to(device), attention_mask=tok["attention_mask"].to(device))
        return out.text_embeds.float()


def build_tiny_clip(
    tiny_cfg: TinyClipConfig, embed_dim: int, out_dir: str | os.PathLike, seed: int = 0
) -> ClipTextTeacher:
    """Random-weight `CLIPTextModelWithProjection` + an offline BPE tokenizer, saved so `from_pretrained` loads it.

    The tokenizer wraps text as `<|startoftext|> ... <|endoftext|>` and pads with `<|endoftext|>`, like CLIP's.
    CLIP pools the first `eos_token_id` position, except that a config with `eos_token_id == 2` takes the
    argmax id instead (checkpoints from before transformers#24773): the tiny ids are 0 (BOS) and 1 (EOS).
    """
    tokenizer = build_tiny_tokenizer(pad=None, bos=CLIP_BOS, eos=CLIP_EOS, extra_special_tokens={}, append_eos=True)
    config = CLIPTextConfig(**text_config_kwargs(tiny_cfg, tokenizer, max_positions=77), projection_dim=embed_dim)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPTextModelWithProjection(config).float()
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return ClipTextTeacher(model, tokenizer)


def ensure_tiny_clip(cfg: ClipRegConfig, seed: int = 0) -> bool:
    """If `cfg.tiny` is set and `cfg.pretrained` is a missing folder, write the tiny CLIP text model there."""
    if cfg.tiny is None or not cfg.pretrained:
        return False
    tiny = cfg.tiny
    return write_folder_once(cfg.pretrained, lambda tmp: build_tiny_clip(tiny, cfg.embed_dim, Path(tmp), seed=seed))


def decode_instructions(tokenizer: Any, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """Backbone token ids `[B, L]` + mask → the instruction strings (special tokens dropped)."""
    rows = [row[keep].tolist() for row, keep in zip(ids.cpu(), mask.bool().cpu(), strict=True)]
    return [text.strip() for text in tokenizer.batch_decode(rows, skip_special_tokens=True)]


def pool_action_states(states: torch.Tensor, batch_size: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample mean of action-position hidden states, float32 `[B, D]`.

    `states` `[B*T', K, D]` holds the rows of each sample contiguously (T' = frames folded into the batch,
    1 when a window is one sequence); `mask` `[B*T', K]` picks the action positions (None: all K).
    """
    weight = torch.ones(states.shape[:2], device=states.device) if mask is None else mask.float()
    sums = reduce(states.float() * weight.unsqueeze(-1), "(b t) k d -> b d", "sum", b=batch_size)
    counts = reduce(weight, "(b t) k -> b", "sum", b=batch_size).clamp(min=1)
    return sums / counts.unsqueeze(-1)


class ClipRegularizer(nn.Module):
    """Trainable projection (LM hidden → CLIP embedding) + the frozen teacher, held outside the module tree."""

    def __init__(self, hidden_size: int, cfg: ClipRegConfig, teacher: ClipTextTeacher | None = None):
        super().__init__()
        if cfg.loss not in ("cosine", "smooth_l1"):
            raise ValueError(f"model.clip_reg.loss={cfg.loss!r}; use 'cosine' or 'smooth_l1'")
        if teacher is not None and teacher.embed_dim != cfg.embed_dim:
            raise ValueError(
                f"model.clip_reg.embed_dim={cfg.embed_dim} but the CLIP model {cfg.pretrained!r} has "
                f"projection_dim {teacher.embed_dim}: set model.clip_reg.embed_dim={teacher.embed_dim}"
            )
        self.loss_type = cfg.loss
        self.proj = nn.Linear(hidden_size, cfg.embed_dim)
        # A plain attribute (ClipTextTeacher is no nn.Module): not a submodule, parameter or state-dict entry.
        self.teacher = teacher

    def loss(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """`[B, E]` prediction vs CLIP text embedding → scalar: 1 - cosine similarity, or smooth-L1 per element."""
        pred = pred.float()
        if self.loss_type == "cosine":
            return (1.0 - F.cosine_similarity(pred, target, dim=-1)).mean()
        return F.smooth_l1_loss(pred, target)

    def forward(self, pooled: torch.Tensor, texts: list[str]) -> torch.Tensor:
        """Pooled action states `[B, D]` + instruction strings → `loss_clip` (scalar)."""
        if self.teacher is None:
            raise RuntimeError(
                "the CLIP regulariser has no text model: it was built with build_model(load_clip=False), "
                "which is for export and inference; build with load_clip=True to train"
            )
        target = self.teacher.embed(texts, pooled.device)
        return self.loss(self.proj(pooled.to(self.proj.weight.dtype)), target)

    def touch(self, like: torch.Tensor) -> torch.Tensor:
        """0-valued scalar that puts `proj` in the graph (a zero gradient) on batches without a CLIP term (ZeRO)."""
        x = torch.zeros(1, self.proj.in_features, device=like.device, dtype=self.proj.weight.dtype)
        return zero_touch(self.proj(x))
