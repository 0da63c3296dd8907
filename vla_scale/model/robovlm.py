"""RoboVLM: a pretrained VLM turned into a robot policy by token fusion and learnable action tokens.

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

With `model.action_space: discrete` there are no learnable action tokens and no head: the
action chunk is binned onto reserved vocabulary ids (`ActionTokenizer`), which take the
action tokens' place, A x N of them per frame, chunk-major (all dims of step 0, then step 1 ...):

    [BOS] image [state] instruction a(0,0) .. a(0,A-1) a(1,0) .. a(N-1,A-1) [EOS if model.discrete.supervise_eos]

trained with next-token cross-entropy on those ids and decoded greedily at inference.
Vision-language batches use the same fusion without action tokens and a next-token loss.

History over a window of T frames (`model.history_type`):

- `post` (the layouts above): the window folded into the batch, one sequence per frame. With
  `model.head.type: lstm | gpt` the head fuses the frames' pooled action-token states causally over
  time, and keeps per-episode memory at inference (`predict_action_step`, `reset`).
- `pre`: one sequence per sample, the frames interleaved, each followed by its own action slot

      [BOS] img_1 [state_1] instruction act_1 img_2 [state_2] act_2 ... img_T [state_T] act_T [EOS]

  (the instruction right after BOS with `instruction_first`; img_t with its start/end tokens). Causal
  attention lets act_t see frames <= t only; each act_t (latent_num tokens, or frame t's A x N discrete
  ids) predicts frame t's chunk.
- `video`: the same interleaving with one action slot, after the last frame; it predicts the last
  frame's chunk only, so losses use the last frame's chunk and `predict_action` returns `[B, 1, N, ...]`.

With T = 1 the three build the same single-frame sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla_scale.config.load import validate_history
from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.backbones.base import BackboneAdapter, ensure_tiny_backbone, load_backbone
from vla_scale.model.clip_regularizer import (
    ClipRegularizer,
    ClipTextTeacher,
    decode_instructions,
    ensure_tiny_clip,
    pool_action_states,
)
from vla_scale.model.discrete_decoding import greedy_decode, greedy_decode_uncached
from vla_scale.model.history_heads import HistoryHead, build_action_head
from vla_scale.model.lora import apply_lora
from vla_scale.model.resampler import PerceiverResampler
from vla_scale.model.state_encoder import StateEncoder


@dataclass
class FusedSequence:
    """One LM input built by `RoboVLM.fuse`; all tensors `[B', L]` (embeds `[B', L, D]`)."""

    embeds: torch.Tensor
    attention_mask: torch.Tensor  # bool, True on real positions
    labels: torch.Tensor  # int64, IGNORE_INDEX except on labelled text tokens
    action_mask: torch.Tensor  # bool, True on action-token positions (learned tokens or discrete action ids)


class RoboVLM(nn.Module):
    """Backbone adapter + learnable action tokens + action head; `forward(batch)` returns named losses."""

    def __init__(
        self,
        cfg: ModelConfig,
        action_dim: int,
        state_dim: int,
        adapter: BackboneAdapter,
        chunk_size: int = 1,
        clip_teacher: ClipTextTeacher | None = None,
    ):
        super().__init__()
        if cfg.action_space not in ("continuous", "discrete"):
            raise ValueError(f"model.action_space={cfg.action_space!r}; use 'continuous' or 'discrete'")
        if cfg.history_type not in ("post", "pre", "video"):
            raise ValueError(f"model.history_type={cfg.history_type!r}; use 'post', 'pre' or 'video'")
        validate_history(cfg)
        if cfg.latent_num < 1:
            raise ValueError(f"model.latent_num must be >= 1, got {cfg.latent_num}")
        self.cfg = cfg
        self.action_dim = action_dim
        self.state_dim = state_dim
        self.chunk_size = chunk_size
        self.latent_num = cfg.latent_num
        self.adapter = adapter
        hidden = adapter.hidden_size
        dtype = adapter.embed_dtype  # match a backbone loaded in bf16
        self.action_token: nn.Parameter | None = None
        self.action_head: nn.Module | None = None  # maps [B, T, latent_num, D] to [B, T, N, ...] chunks
        self.action_tokenizer: ActionTokenizer | None = None
        if cfg.action_space == "discrete":
            self.action_tokenizer = self._build_action_tokenizer()
        else:
            # Small normal, not zeros: the LM's first RMSNorm has a huge gradient at the zero vector.
            self.action_token = nn.Parameter((torch.randn(hidden) * 0.02).to(dtype))
            self.action_head = build_action_head(cfg.head, hidden, action_dim, chunk_size, cfg.latent_num).to(dtype)
        self.state_encoder = StateEncoder(state_dim, hidden).to(dtype) if cfg.use_state else None
        self.resampler: PerceiverResampler | None = None
        if cfg.resampler.enabled:
            self.resampler = PerceiverResampler.from_config(hidden, cfg.resampler).to(dtype)
        adapter.images_resampled = self.resampler is not None
        # The frozen CLIP text model stays outside the module tree (see clip_regularizer); only `proj` trains.
        self.clip_reg = ClipRegularizer(hidden, cfg.clip_reg, clip_teacher).to(dtype) if cfg.clip_reg.enabled else None

    def _build_action_tokenizer(self) -> ActionTokenizer:
        """Bins on the last `n_bin` ids of the backbone's base vocabulary, checked against its special tokens."""
        d = self.cfg.discrete
        tokenizer = ActionTokenizer(self.adapter.tokenizer, d.n_bin, d.min_action, d.max_action)
        rows = self.adapter.model.get_input_embeddings().num_embeddings
        if tokenizer.vocab_size > rows:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the LM's {rows} embedding rows")
        specials = {self.adapter.bos_id, self.adapter.eos_id, self.adapter.pad_id}
        specials |= {self.adapter.image_start_id, self.adapter.image_end_id}
        specials |= set(getattr(self.adapter.tokenizer, "all_special_ids", []))
        clash = sorted(i for i in specials if i is not None and i >= tokenizer.first_id)
        if clash:
            raise ValueError(
                f"model.discrete.n_bin={d.n_bin} would turn special token ids {clash} into action bins "
                f"(action ids start at {tokenizer.first_id}); lower n_bin"
            )
        if d.supervise_eos and self.adapter.eos_id is None:
            raise ValueError("model.discrete.supervise_eos is on but the backbone's tokenizer has no EOS token")
        return tokenizer

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (the data collate tokenizes with it)."""
        return self.adapter.tokenizer

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B', C, H, W]` → image tokens `[B', N, D]`: the adapter's, or `resampler.num_latents` of them.

        Every image path (static and wrist cameras, VL images) goes through here, so the resampler is in
        every batch's graph and needs no ZeRO zero-touch.
        """
        tokens = self.adapter.encode_images(images)
        return tokens if self.resampler is None else self.resampler(tokens)

    # --- sequence assembly ------------------------------------------------------------
    def _text_keep(self, ids: torch.Tensor, mask: torch.Tensor, strip_eos: bool) -> torch.Tensor:
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
        `[img_start] image_f [img_end] [state_f] [action slot]`, the text after frame 0's image and state
        (right after BOS with `text_first`); `state_tokens` is `[B', F, D]`. Action slots follow every frame
        (`action_frames="each"`, history `pre`) or the last one only (`"last"`, `video`). A slot holds
        `n_action` learned action tokens, or the embeddings of discrete `action_ids` `[B', K]` (one slot) or
        `[B', S, K]` labelled with `action_labels`; S ids fill the first S slots, so a decoding prompt can
        leave the current frame's slot empty. `eos_label` labels the appended EOS with its own id.
        """
        if n_action and action_ids is not None:
            raise ValueError("fuse takes learned action tokens (n_action) or discrete action_ids, not both")
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
        rows, device, dtype = text_ids.shape[0], text_ids.device, self.adapter.embed_dtype
        embeds, keeps, labels, is_action = [], [], [], []

        def add(
            emb: torch.Tensor, keep: torch.Tensor | None = None, lab: torch.Tensor | None = None, act: bool = False
        ):
            n = emb.shape[1]
            embeds.append(emb.to(dtype))
            keeps.append(keep if keep is not None else torch.ones(rows, n, dtype=torch.bool, device=device))
            labels.append(lab if lab is not None else torch.full((rows, n), IGNORE_INDEX, device=device))
            is_action.append(torch.full((rows, n), act, dtype=torch.bool, device=device))

        def special(token_id: int) -> torch.Tensor:
            emb = self.adapter.embed_tokens(torch.tensor([token_id], device=device))
            return repeat(emb, "n d -> b n d", b=rows)

        def add_text() -> None:
            safe_ids = torch.where(text_keep, text_ids, torch.zeros_like(text_ids))  # padding may hold any id
            text_lab = None if text_labels is None else torch.where(text_keep, text_labels, IGNORE_INDEX)
            add(self.adapter.embed_tokens(safe_ids), text_keep, text_lab)

        if self.adapter.bos_id is not None:
            add(special(self.adapter.bos_id))
        if text_first:
            add_text()
        for f in range(n_frames):
            if self.adapter.image_start_id is not None:
                add(special(self.adapter.image_start_id))
            add(frames[:, f])
            if self.adapter.image_end_id is not None:
                add(special(self.adapter.image_end_id))
            if state_tokens is not None:
                add(state_tokens[:, f : f + 1])
            if f == 0 and not text_first:
                add_text()
            if f not in slot_frames:
                continue
            slot = slot_frames.index(f)
            if n_action:
                add(repeat(self.action_token, "d -> b n d", b=rows, n=n_action), act=True)
            if action_ids is not None and slot < action_ids.shape[1]:
                lab = None if action_labels is None else action_labels[:, slot]
                add(self.adapter.embed_tokens(action_ids[:, slot]), lab=lab, act=True)
        if append_eos and self.adapter.eos_id is not None:
            eos_lab = torch.full((rows, 1), self.adapter.eos_id, device=device) if eos_label else None
            add(special(self.adapter.eos_id), lab=eos_lab)

        keep = torch.cat(keeps, dim=1)
        # Stable sort on "dropped": kept slots keep their order and move left, dropped ones go to the end.
        order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)
        order = order[:, : int(keep.sum(dim=1).max())]
        return FusedSequence(
            embeds=torch.take_along_dim(torch.cat(embeds, dim=1), order.unsqueeze(-1), dim=1),
            attention_mask=torch.take_along_dim(keep, order, dim=1),
            labels=torch.take_along_dim(torch.cat(labels, dim=1), order, dim=1),
            action_mask=torch.take_along_dim(torch.cat(is_action, dim=1), order, dim=1),
        )

    # --- robot path ---------------------------------------------------------------------
    def _robot_sequence(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        wrist_images: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
        **fuse_kwargs: Any,
    ) -> FusedSequence:
        """The window's fused sequences, with the action slot given by `fuse_kwargs` (learned tokens + EOS, discrete
        ids, or nothing for a decoding prompt): `post` folds the window into the batch, one sequence per frame
        `[B*T, L]`; `pre` / `video` interleave the frames into one sequence per sample `[B, L]`."""
        if images.dim() != 5:
            raise ValueError(f"images must be [B, T, C, H, W], got shape {tuple(images.shape)}")
        b, t = images.shape[:2]
        image_tokens = self.encode_images(rearrange(images, "b t c h w -> (b t) c h w"))
        if wrist_images is not None:
            wrist_tokens = self.encode_images(rearrange(wrist_images, "b t c h w -> (b t) c h w"))
            image_tokens = torch.cat([image_tokens, wrist_tokens], dim=1)
        state_tokens = None
        if self.state_encoder is not None:
            if state is None:
                raise ValueError("model.use_state is on but the batch has no `state` [B, T, S]")
            state_tokens = self.state_encoder(state)  # [B, T, D]
        if self.cfg.history_type == "post":
            ids = repeat(text_ids, "b l -> (b t) l", t=t)
            mask = repeat(text_mask.bool(), "b l -> (b t) l", t=t)
            if state_tokens is not None:
                state_tokens = rearrange(state_tokens, "b t d -> (b t) 1 d")
        else:
            ids, mask = text_ids, text_mask.bool()
            image_tokens = rearrange(image_tokens, "(b t) n d -> b t n d", b=b, t=t)
            fuse_kwargs.setdefault("action_frames", "each" if self.cfg.history_type == "pre" else "last")
        keep = self._text_keep(ids, mask, strip_eos=True)
        return self.fuse(
            image_tokens, ids, keep, state_tokens=state_tokens, text_first=self.cfg.instruction_first, **fuse_kwargs
        )

    def _action_outputs(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        wrist_images: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Continuous head → (arm `[B, T', N, A-1]`, gripper logits `[B, T', N, 1]`, action-token hidden states
        `[B*T', latent_num, D]`, number of attended LM positions); T' = T, or 1 under `video` (the last frame's
        chunk). A history head (lstm / gpt) runs over the given window from a fresh state."""
        latents, num_tokens = self._action_latents(images, text_ids, text_mask, wrist_images, state)
        arm, gripper = self.action_head(latents)
        return arm, gripper, rearrange(latents, "b t n d -> (b t) n d"), num_tokens

    def _action_latents(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        wrist_images: torch.Tensor | None = None,
        state: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Learned action tokens' output states `[B, T', latent_num, D]` (T' as in `_action_outputs`) and the
        number of attended LM positions."""
        b, t = images.shape[:2]
        fused = self._robot_sequence(
            images, text_ids, text_mask, wrist_images, state, n_action=self.latent_num, append_eos=True
        )
        hidden, _, _ = self.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        frames = 1 if self.cfg.history_type == "video" else t
        # Action positions in row-major order: sample, then frame (its own row, or its slot in the row), then token.
        latents = rearrange(hidden[fused.action_mask], "(b t n) d -> b t n d", b=b, t=frames, n=self.latent_num)
        return latents, fused.attention_mask.sum()

    def _chunk_targets(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunks the model predicts, `[B, T', N, A]`, and their mask `[B, T', N]`: every frame's, or under
        `video` the last frame's only."""
        assert batch.action is not None
        mask = batch.action_mask if batch.action_mask is not None else torch.ones_like(batch.action[..., 0]).bool()
        if self.cfg.history_type == "video":
            return batch.action[:, -1:], mask[:, -1:]
        return batch.action, mask

    def _check_action(self, batch: Batch) -> None:
        if batch.action is None:
            raise ValueError("a robot batch needs `action` [B, T, N, A]")
        n, a = batch.action.shape[-2:]
        if (n, a) != (self.chunk_size, self.action_dim):
            raise ValueError(
                f"batch action chunk is N={n}, A={a} but the model was built for N={self.chunk_size}, "
                f"A={self.action_dim}: build_model(chunk_size=data.fwd_pred_next_n, action_dim=dataset action dims)"
            )

    def _robot_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        self._check_action(batch)
        if self.action_tokenizer is not None:
            return self._discrete_losses(batch)
        arm, gripper, action_hidden, num_tokens = self._action_outputs(
            batch.images, batch.text_ids, batch.text_mask, batch.wrist_images, batch.state
        )
        action, mask = self._chunk_targets(batch)
        # Zero the targets of masked steps first so NaN/inf padding cannot leak into loss or gradients.
        target = torch.where(mask.unsqueeze(-1), action.float(), 0.0)
        count = mask.sum().clamp(min=1)
        if self.cfg.head.arm_loss == "huber":
            arm_err = F.huber_loss(arm.float(), target[..., :-1], reduction="none", delta=1.0)
        else:
            arm_err = F.mse_loss(arm.float(), target[..., :-1], reduction="none")
        loss_arm = torch.where(mask, arm_err.mean(dim=-1), 0.0).sum() / count
        grip_logit, grip_target = gripper.float()[..., 0], target[..., -1]
        bce = F.binary_cross_entropy_with_logits(grip_logit, grip_target, reduction="none")
        loss_gripper = torch.where(mask, bce, 0.0).sum() / count
        correct = (grip_logit > 0) == (grip_target > 0.5)
        acc_gripper = (correct & mask).sum().float().detach() / count
        weights = self.cfg.loss_weights
        loss = weights.arm * loss_arm + weights.gripper * loss_gripper
        # ZeRO wants the same set of gradients on every rank whatever batch kind each rank drew;
        # lm_head is idle on robot batches, so touch it with one token (value 0, gradient 0).
        loss = loss + 0.0 * self.adapter.lm_head(action_hidden[:1, :1]).float().sum()
        out = {
            "loss": loss,
            "loss_arm": loss_arm,
            "loss_gripper": loss_gripper,
            "acc_gripper": acc_gripper,
            "num_tokens": num_tokens,
        }
        return self._with_clip_loss(out, batch, action_hidden)

    def _with_clip_loss(
        self, out: dict[str, torch.Tensor], batch: Batch, states: torch.Tensor, mask: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Add `loss_clip` (and its weighted share of `loss`) to a robot batch's terms when the regulariser is on.

        `states` `[B*T', K, D]` are hidden states whose positions `mask` `[B*T', K]` marks as action positions
        (None: all of them); they are pooled per sample, so any number of frames per sample works.
        """
        if self.clip_reg is None:
            return out
        pooled = pool_action_states(states, batch.batch_size, mask)
        texts = decode_instructions(self.adapter.tokenizer, batch.text_ids, batch.text_mask)
        out["loss_clip"] = self.clip_reg(pooled, texts)
        out["loss"] = out["loss"] + self.cfg.loss_weights.clip * out["loss_clip"]
        return out

    def _discrete_labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Action chunks → (ids chunk-major, labels: the ids, -100 on masked chunk steps): `[B*T, N*A]` under `post`
        (one sequence per frame), else `[B, T', N*A]`, one action slot per predicted frame (T' as `_chunk_targets`)."""
        assert self.action_tokenizer is not None and batch.action is not None
        action, mask = self._chunk_targets(batch)
        # Masked steps hold any value (NaN past the episode end): give them a valid id, then ignore it.
        target = torch.where(mask.unsqueeze(-1), action.float(), 0.0)
        ids = self.action_tokenizer.encode_chunk(target)
        labels = torch.where(mask.unsqueeze(-1), ids, IGNORE_INDEX)
        flat = "b t n a -> (b t) (n a)" if self.cfg.history_type == "post" else "b t n a -> b t (n a)"
        return rearrange(ids, flat), rearrange(labels, flat)

    def _discrete_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Next-token cross-entropy on the action ids (and EOS if `supervise_eos`); logits only where supervised."""
        ids, labels = self._discrete_labels(batch)
        fused = self._robot_sequence(
            batch.images,
            batch.text_ids,
            batch.text_mask,
            batch.wrist_images,
            batch.state,
            action_ids=ids,
            action_labels=labels,
            append_eos=self.cfg.discrete.supervise_eos,
            eos_label=True,
        )
        hidden, _, _ = self.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        # Labels sit on their own token; position i predicts token i + 1.
        targets = fused.labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = self.adapter.compute_logits(hidden[:, :-1][supervised]).float()  # [M, V]
        targets = targets[supervised]
        count = supervised.sum().clamp(min=1)
        loss_action_ce = F.cross_entropy(logits, targets, reduction="sum") / count
        acc = (logits.argmax(dim=-1) == targets).sum().float().detach() / count
        # No masked step anywhere leaves M = 0: the loss is 0 but lm_head still joins the graph (ZeRO).
        loss = self.cfg.loss_weights.action_ce * loss_action_ce
        out = {
            "loss": loss,
            "loss_action_ce": loss_action_ce,
            "acc_action_token": acc,
            "num_tokens": fused.attention_mask.sum(),
        }
        return self._with_clip_loss(out, batch, hidden, fused.action_mask)

    # --- vision-language path ---------------------------------------------------------
    def _vl_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.images.dim() != 5 or batch.images.shape[1] != 1:
            raise ValueError(f"a VL batch needs images [B, 1, C, H, W], got shape {tuple(batch.images.shape)}")
        image_tokens = self.encode_images(batch.images[:, 0])
        mask = batch.text_mask.bool()
        fused = self.fuse(
            image_tokens, batch.text_ids, self._text_keep(batch.text_ids, mask, strip_eos=False), batch.text_labels
        )
        _, logits, _ = self.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=True)
        # Labels sit on their own token (HF convention); position i predicts token i + 1.
        labels = fused.labels[:, 1:]
        ce = F.cross_entropy(
            rearrange(logits[:, :-1].float(), "b l v -> (b l) v"),
            rearrange(labels, "b l -> (b l)"),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss_vl = ce / (labels != IGNORE_INDEX).sum().clamp(min=1)
        loss = self.cfg.loss_weights.vl * loss_vl
        # Same reason as on robot batches: the action token and head are idle here, so touch them (value 0).
        if self.action_head is not None and self.action_token is not None:
            arm, gripper = self.action_head(repeat(self.action_token, "d -> 1 1 n d", n=self.latent_num))
            loss = loss + 0.0 * (arm.float().sum() + gripper.float().sum())
        if self.state_encoder is not None:
            idle = self.state_encoder(torch.zeros(1, self.state_dim, device=image_tokens.device))
            loss = loss + 0.0 * idle.float().sum()
        if self.clip_reg is not None:
            loss = loss + self.clip_reg.touch(image_tokens)
        return {"loss": loss, "loss_vl": loss_vl, "num_tokens": fused.attention_mask.sum()}

    # --- public API ---------------------------------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named 0-dim loss terms and metrics plus the weighted `loss` (names are the wandb keys).

        Robot batches: loss, loss_arm, loss_gripper, acc_gripper (continuous) or loss, loss_action_ce,
        acc_action_token (discrete: argmax over the whole vocabulary on supervised positions); VL batches:
        loss, loss_vl. All add
        `num_tokens` (LM positions attended, images included) for throughput, not a metric to average.
        """
        if batch.data_source == "robot":
            return self._robot_losses(batch)
        if batch.data_source == "vl":
            return self._vl_losses(batch)
        raise ValueError(f"unknown data_source {batch.data_source!r}; expected 'robot' or 'vl'")

    @torch.no_grad()
    def predict_action(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        state: torch.Tensor | None = None,
        wrist_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images `[B, T, C, H, W]` → (normalised arm chunk `[B, T', N, A-1]`, gripper probability
        `[B, T', N, 1]`): T' = T, one chunk per frame (`post`, `pre`), or T' = 1, the last frame's chunk
        (`video`). `state` `[B, T, S]` (normalised) is required when `model.use_state` is on. Head memory is
        neither used nor changed: an lstm/gpt head runs over the given window as in training (from a fresh
        state); `predict_action_step` is the stepwise path.

        Discrete: greedy KV-cached decoding of the A x N action ids; arm dims are bin centres and the
        gripper "probability" is hard, 1.0 when the decoded gripper bin is in the closed half, else 0.0.
        """
        if self.action_tokenizer is not None:
            ids = self.decode_action_ids(images, text_ids, text_mask, state, wrist_images)
            return self.action_tokenizer.decode_chunk(ids)
        arm, gripper, _, _ = self._action_outputs(images, text_ids, text_mask, wrist_images, state)
        return arm.float(), torch.sigmoid(gripper.float())

    @torch.no_grad()
    def decode_action_ids(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        state: torch.Tensor | None = None,
        wrist_images: torch.Tensor | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Discrete action space: greedy action ids `[B, T', N, A]`, T' as in `predict_action` (`use_cache=False`
        is the slow reference).

        `pre` decodes frame by frame: frame f's prompt holds frames <= f and the ids decoded for the earlier
        frames in their slots (training feeds the true ones there), so it costs T decodes.
        """
        if self.action_tokenizer is None:
            raise ValueError("decode_action_ids needs model.action_space: discrete")
        b, t = images.shape[:2]
        tok = self.action_tokenizer
        decode = greedy_decode if use_cache else greedy_decode_uncached
        n_tokens = self.chunk_size * self.action_dim
        id_range = (tok.first_id, tok.vocab_size)
        if self.cfg.history_type == "pre":
            done: torch.Tensor | None = None  # [B, f, N*A]: ids of the frames before f
            for f in range(1, t + 1):
                upto = [None if x is None else x[:, :f] for x in (images, wrist_images, state)]
                prompt = self._robot_sequence(upto[0], text_ids, text_mask, upto[1], upto[2], action_ids=done)
                new = decode(self.adapter, prompt.embeds, prompt.attention_mask, n_tokens, id_range)[:, None]
                done = new if done is None else torch.cat([done, new], dim=1)
            return rearrange(done, "b t (n a) -> b t n a", a=self.action_dim)
        prompt = self._robot_sequence(images, text_ids, text_mask, wrist_images, state)
        ids = decode(self.adapter, prompt.embeds, prompt.attention_mask, n_tokens, id_range)
        if self.cfg.history_type == "video":
            return rearrange(ids, "b (n a) -> b 1 n a", a=self.action_dim)
        return rearrange(ids, "(b t) (n a) -> b t n a", b=b, t=t, a=self.action_dim)

    # --- stepwise inference with head memory ------------------------------------------------
    @property
    def stepwise(self) -> bool:
        """True when the head keeps per-episode memory (lstm / gpt, history `post`): call `predict_action_step`
        with one frame per control step (and `reset()` between episodes) instead of passing the window."""
        return isinstance(self.action_head, HistoryHead)

    def reset(self) -> None:
        """Start a new episode: clear the head's memory (nothing to clear for other heads)."""
        if isinstance(self.action_head, HistoryHead):
            self.action_head.reset()

    @torch.no_grad()
    def predict_action_step(
        self,
        images: torch.Tensor,
        text_ids: torch.Tensor,
        text_mask: torch.Tensor,
        state: torch.Tensor | None = None,
        wrist_images: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One control step with a history head: the current frame `[B, 1, C, H, W]` (state `[B, 1, S]`) →
        (arm `[B, 1, N, A-1]`, gripper probability `[B, 1, N, 1]`), fused with the frames seen since `reset()`
        (the last `head.max_history`); equals `predict_action`'s last frame over that window."""
        if not isinstance(self.action_head, HistoryHead):
            raise ValueError(
                "predict_action_step needs model.head.type lstm or gpt; other heads take the window in predict_action"
            )
        if images.dim() != 5 or images.shape[1] != 1:
            raise ValueError(f"predict_action_step takes one frame [B, 1, C, H, W], got shape {tuple(images.shape)}")
        latents, _ = self._action_latents(images, text_ids, text_mask, wrist_images, state)
        arm, gripper = self.action_head.step(latents[:, 0])
        return arm[:, None].float(), torch.sigmoid(gripper[:, None].float())


def build_model(
    cfg: ModelConfig,
    action_dim: int,
    state_dim: int,
    chunk_size: int = 1,
    torch_dtype: torch.dtype | str | None = None,
    load_clip: bool = True,
) -> RoboVLM:
    """Load the configured backbone through the registry (writing the tiny one first if configured) and wrap it.

    `chunk_size` is `data.fwd_pred_next_n`. Under ZeRO-3 create transformers' `HfDeepSpeedConfig`
    before calling this, so `from_pretrained` loads the backbone partitioned. With `model.clip_reg` on,
    the frozen CLIP text model is loaded whole (it is a training-only teacher); `load_clip=False` skips
    it for export and inference, where the regulariser's projection is kept only so weights load strictly.
    """
    clip_teacher = None
    if cfg.clip_reg.enabled and load_clip:
        ensure_tiny_clip(cfg.clip_reg)
        clip_teacher = ClipTextTeacher.from_pretrained(cfg.clip_reg.pretrained)
    backbone = cfg.backbone
    ensure_tiny_backbone(backbone)
    adapter = load_backbone(backbone.family, backbone.pretrained, backbone.trust_remote_code, torch_dtype)
    if backbone.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if cfg.lora.enabled:
        apply_lora(adapter.decoder_layers, cfg.lora)
    model = RoboVLM(cfg, action_dim, state_dim, adapter, chunk_size=chunk_size, clip_teacher=clip_teacher)
    if backbone.gradient_checkpointing and hasattr(model.action_head, "gradient_checkpointing"):
        model.action_head.gradient_checkpointing = True  # history heads: recompute the time model too
    return model
