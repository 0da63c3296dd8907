"""Sequence building: image, state, instruction and action slots fused into one LM input per row.

Per frame, one sequence goes through the VLM's language model:

    [BOS] [img_start] image tokens [img_end] [state] instruction tokens [action x latent_num] [EOS]

or, with `model.instruction_first`, the instruction right after BOS, so that under causal
attention every image token can already attend to the instruction:

    [BOS] instruction tokens [img_start] image tokens [img_end] [state] [action x latent_num] [EOS]

(image start/end only for families that have them; the state token with `model.use_state`).
The instruction arrives right-padded; the sequence is assembled from fixed slots and then
compacted with a stable sort on "is padding", so each sample's action tokens sit right
after its own last real text token and all padding moves to the end. The action tokens'
output states feed the action head.

With `model.action_space: discrete` the action slot holds the chunk's action ids instead
(A x N of them per frame, chunk-major: all dims of step 0, then step 1 ...), see `discrete.py`.
Vision-language batches use the same fusion without action slots.

History over a window of T frames (`model.history_type`):

- `post` (the layouts above): the window folded into the batch, one sequence per frame.
- `pre`: one sequence per sample, the frames interleaved, each followed by its own action slot

      [BOS] img_1 [state_1] instruction act_1 img_2 [state_2] act_2 ... img_T [state_T] act_T [EOS]

  (the instruction right after BOS with `instruction_first`; img_t with its start/end tokens). Causal
  attention lets act_t see frames <= t only; each act_t predicts frame t's chunk.
- `video`: the same interleaving with one action slot, after the last frame; it predicts the last
  frame's chunk only (`chunk_targets`, `predicted_frames`).

With T = 1 the three build the same single-frame sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from einops import rearrange, repeat

from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation
from vla_scale.model.backbones import BackboneAdapter


@dataclass
class FusedSequence:
    """One LM input built by `SequenceBuilder.fuse`; all tensors `[B', L]` (embeds `[B', L, D]`)."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor  # bool, True on real positions
    labels: torch.Tensor  # int64, IGNORE_INDEX except on labelled text tokens
    action_mask: torch.Tensor  # bool, True on action-token positions (learned tokens or discrete action ids)


def predicted_frames(history_type: str, num_frames: int) -> int:
    """T': how many frames of a T-frame window get a predicted chunk (`video`: the last one only)."""
    return 1 if history_type == "video" else num_frames


def chunk_targets(batch: Batch, history_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunks the model predicts, `[B, T', N, A]`, and their mask `[B, T', N]`: every frame's, or under
    `video` the last frame's only."""
    if batch.action is None:
        raise ValueError("chunk_targets takes a robot batch, one with `action`")
    mask = batch.action_mask if batch.action_mask is not None else torch.ones_like(batch.action[..., 0]).bool()
    if history_type == "video":
        return batch.action[:, -1:], mask[:, -1:]
    return batch.action, mask


class _Segments:
    """The segments of a batch of rows in sequence order, before compaction: embeddings and, per position,
    keep (real, not dropped), label and is-action."""

    def __init__(self, adapter: BackboneAdapter, rows: int, device: torch.device):
        self.adapter, self.rows, self.device = adapter, rows, device
        self.embeds: list[torch.Tensor] = []
        self.keeps: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.is_action: list[torch.Tensor] = []

    def add(
        self,
        emb: torch.Tensor,
        keep: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        action: bool = False,
    ) -> None:
        """Append `[rows, n, D]` embeddings; positions are kept and unlabelled unless told otherwise."""
        rows, n, device = self.rows, emb.shape[1], self.device
        self.embeds.append(emb.to(self.adapter.embed_dtype))
        self.keeps.append(keep if keep is not None else torch.ones(rows, n, dtype=torch.bool, device=device))
        self.labels.append(labels if labels is not None else torch.full((rows, n), IGNORE_INDEX, device=device))
        self.is_action.append(torch.full((rows, n), action, dtype=torch.bool, device=device))

    def add_special(self, token_id: int | None, labelled: bool = False) -> None:
        """One special token in every row (nothing if the family has none); `labelled`: supervise it."""
        if token_id is None:
            return
        emb = self.adapter.embed_tokens(torch.tensor([token_id], device=self.device))
        labels = torch.full((self.rows, 1), token_id, device=self.device) if labelled else None
        self.add(repeat(emb, "n d -> b n d", b=self.rows), labels=labels)

    def add_text(self, ids: torch.Tensor, keep: torch.Tensor, labels: torch.Tensor | None) -> None:
        """Text ids `[rows, L]`; positions outside `keep` are dropped at compaction (padding may hold any id)."""
        text_labels = None if labels is None else torch.where(keep, labels, IGNORE_INDEX)
        self.add(embed_text(self.adapter, ids, keep), keep, text_labels)

    def compact(self) -> FusedSequence:
        """Stable sort on "dropped": kept positions keep their order and move left, dropped ones go to the end
        and are trimmed to the longest row."""
        keep = torch.cat(self.keeps, dim=1)
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        order = order[:, : int(keep.sum(dim=1).max())]
        return FusedSequence(
            embeds=torch.take_along_dim(torch.cat(self.embeds, dim=1), order.unsqueeze(-1), dim=1),
            attention_mask=torch.take_along_dim(keep, order, dim=1),
            labels=torch.take_along_dim(torch.cat(self.labels, dim=1), order, dim=1),
            action_mask=torch.take_along_dim(torch.cat(self.is_action, dim=1), order, dim=1),
        )


def embed_text(adapter: BackboneAdapter, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Token embeddings `[B, L, D]` of text ids `[B, L]`; positions outside `keep` are embedded as id 0, since
    padding may hold any id (even one outside the vocabulary) and is dropped or masked by the caller."""
    return adapter.embed_tokens(torch.where(keep, ids, torch.zeros_like(ids)))


class SequenceBuilder:
    """Builds the LM inputs of one model: the backbone's special tokens, the history layout, the instruction slot.

    Holds the backbone adapter (for token embeddings and special ids) and no parameters of its own.
    """

    def __init__(self, adapter: BackboneAdapter, history_type: str = "post", instruction_first: bool = False):
        self.adapter = adapter
        self.history_type = history_type
        self.instruction_first = instruction_first

    def text_keep(self, ids: torch.Tensor, mask: torch.Tensor, strip_eos: bool) -> torch.Tensor:
        """Real text tokens minus a leading BOS (the sequence gets its own, before the image) and, if asked, a
        trailing EOS (action tokens go before EOS). So instructions may be tokenized with or without specials."""
        keep = mask.clone()
        rows = torch.arange(ids.shape[0], device=ids.device)
        has_text = mask.any(dim=1)
        if self.adapter.bos_id is not None:
            first = mask.int().argmax(dim=1)
            keep[rows, first] &= ~(has_text & (ids[rows, first] == self.adapter.bos_id))
        if strip_eos and self.adapter.eos_id is not None:
            last = ids.shape[1] - 1 - mask.flip(1).int().argmax(dim=1)
            keep[rows, last] &= ~(has_text & (ids[rows, last] == self.adapter.eos_id))
        return keep

    def fuse(
        self,
        image_tokens: torch.Tensor,
        text_ids: torch.Tensor,
        text_keep: torch.Tensor,
        text_labels: torch.Tensor | None = None,
        n_action: int = 0,
        action_token: torch.Tensor | None = None,
        append_eos: bool = False,
        state_tokens: torch.Tensor | None = None,
        text_first: bool = False,
        action_ids: torch.Tensor | None = None,
        action_labels: torch.Tensor | None = None,
        eos_label: bool = False,
        action_frames: Literal["each", "last"] = "each",
    ) -> FusedSequence:
        """Assemble `[BOS] image text [action] [EOS]` per row, then compact away the dropped text positions.

        `image_tokens` is one frame `[B', n, D]` or F frames `[B', F, n, D]`, interleaved as
        `[img_start] image_f [img_end] [state_f] [action slot]`, the text (ids `[B', L]`, `text_keep` from
        `text_keep`) after frame 0's image and state (right after BOS with `text_first`); `state_tokens` is
        `[B', F, D]`. Action slots follow every frame (`action_frames="each"`, history `pre`) or the last one
        only (`"last"`, `video`). A slot holds `n_action` copies of the learned `action_token` `[D]`, or the
        embeddings of discrete `action_ids` `[B', K]` (one slot) or `[B', S, K]` labelled with `action_labels`;
        S ids fill the first S slots, so a decoding prompt can leave the current frame's slot empty; negative ids
        pad a slot shorter than K and are dropped like text padding (a following EOS moves up to the last id).
        `eos_label` labels the appended EOS with its own id.
        """
        if n_action and action_ids is not None:
            raise ValueError("fuse takes learned action tokens (n_action) or discrete action_ids, not both")
        if n_action and action_token is None:
            raise ValueError("fuse needs the learned action_token [D] to fill n_action action slots")
        frames = image_tokens if image_tokens.dim() == 4 else image_tokens.unsqueeze(1)
        n_frames = frames.shape[1]
        if state_tokens is not None and state_tokens.shape[1] != n_frames:
            raise ValueError(f"state_tokens hold {state_tokens.shape[1]} frames but image_tokens {n_frames}")
        slot_frames = list(range(n_frames)) if action_frames == "each" else [n_frames - 1]
        if action_ids is not None and action_ids.dim() == 2:
            action_ids = action_ids.unsqueeze(1)
            action_labels = None if action_labels is None else action_labels.unsqueeze(1)
        if action_ids is not None and action_ids.shape[1] > len(slot_frames):
            raise ValueError(f"{action_ids.shape[1]} sets of action ids for {len(slot_frames)} action slots")
        adapter, rows = self.adapter, text_ids.shape[0]
        parts = _Segments(adapter, rows, text_ids.device)
        parts.add_special(adapter.bos_id)
        if text_first:
            parts.add_text(text_ids, text_keep, text_labels)
        for f in range(n_frames):
            parts.add_special(adapter.image_start_id)
            parts.add(frames[:, f])
            parts.add_special(adapter.image_end_id)
            if state_tokens is not None:
                parts.add(state_tokens[:, f : f + 1])
            if f == 0 and not text_first:
                parts.add_text(text_ids, text_keep, text_labels)
            if f not in slot_frames:
                continue
            slot = slot_frames.index(f)
            if n_action:
                parts.add(repeat(action_token, "d -> b n d", b=rows, n=n_action), action=True)
            if action_ids is not None and slot < action_ids.shape[1]:
                ids = action_ids[:, slot]  # ids < 0 pad a variable-length slot (FAST): dropped at compaction
                labels = None if action_labels is None else torch.where(ids >= 0, action_labels[:, slot], IGNORE_INDEX)
                parts.add(adapter.embed_tokens(ids.clamp(min=0)), keep=ids >= 0, labels=labels, action=True)
        if append_eos:
            parts.add_special(adapter.eos_id, labelled=eos_label)
        return parts.compact()

    def robot(
        self, obs: Observation, image_tokens: torch.Tensor, state_tokens: torch.Tensor | None, **slot: Any
    ) -> FusedSequence:
        """A window's fused sequences from its encoded frames: `image_tokens` `[B*T, n, D]` (sample-major, wrist
        tokens appended per frame), `state_tokens` `[B, T, D]` or None; the action slot as `slot` (`fuse`'s
        keywords: learned tokens + EOS, discrete ids, or nothing for a decoding prompt). `post` folds the window
        into the batch, one sequence per frame `[B*T, L]`; `pre` / `video` interleave the frames into one
        sequence per sample `[B, L]`."""
        b, t = obs.batch_size, obs.num_frames
        if self.history_type == "post":
            ids = repeat(obs.text_ids, "b l -> (b t) l", t=t)
            mask = repeat(obs.text_mask.bool(), "b l -> (b t) l", t=t)
            if state_tokens is not None:
                state_tokens = rearrange(state_tokens, "b t d -> (b t) 1 d")
        else:
            ids, mask = obs.text_ids, obs.text_mask.bool()
            image_tokens = rearrange(image_tokens, "(b t) n d -> b t n d", b=b, t=t)
            slot.setdefault("action_frames", "each" if self.history_type == "pre" else "last")
        keep = self.text_keep(ids, mask, strip_eos=True)
        return self.fuse(image_tokens, ids, keep, state_tokens=state_tokens, text_first=self.instruction_first, **slot)
