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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import nn

from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model.action_head import MLPActionHead
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.backbones.base import BackboneAdapter, ensure_tiny_backbone, load_backbone
from vla_scale.model.discrete_decoding import greedy_decode, greedy_decode_uncached
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
    ):
        super().__init__()
        if cfg.action_space not in ("continuous", "discrete"):
            raise ValueError(f"model.action_space={cfg.action_space!r}; use 'continuous' or 'discrete'")
        if cfg.history_type != "post":
            raise ValueError(f"model.history_type={cfg.history_type!r} is not implemented; use 'post'")
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
        self.action_head: MLPActionHead | None = None
        self.action_tokenizer: ActionTokenizer | None = None
        if cfg.action_space == "discrete":
            self.action_tokenizer = self._build_action_tokenizer()
        else:
            # Small normal, not zeros: the LM's first RMSNorm has a huge gradient at the zero vector.
            self.action_token = nn.Parameter((torch.randn(hidden) * 0.02).to(dtype))
            self.action_head = MLPActionHead(
                hidden, action_dim, chunk_size, latent_num=cfg.latent_num, hidden_size=cfg.head.hidden_size
            ).to(dtype)
        self.state_encoder = StateEncoder(state_dim, hidden).to(dtype) if cfg.use_state else None

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
    ) -> FusedSequence:
        """Assemble `[BOS] image text [action] [EOS]` per row, then compact away the dropped text positions.

        The action slot holds `n_action` learned action tokens, or the embeddings of discrete `action_ids`
        `[B', K]` labelled with `action_labels`; `eos_label` labels the appended EOS with its own id.
        """
        if n_action and action_ids is not None:
            raise ValueError("fuse takes learned action tokens (n_action) or discrete action_ids, not both")
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
        if self.adapter.image_start_id is not None:
            add(special(self.adapter.image_start_id))
        add(image_tokens)
        if self.adapter.image_end_id is not None:
            add(special(self.adapter.image_end_id))
        if state_tokens is not None:
            add(state_tokens)
        if not text_first:
            add_text()
        if n_action:
            add(repeat(self.action_token, "d -> b n d", b=rows, n=n_action), act=True)
        if action_ids is not None:
            add(self.adapter.embed_tokens(action_ids), lab=action_labels, act=True)
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
        """Window folded into the batch ("post" history): one fused sequence per frame, `[B*T, L]`, with the
        action slot given by `fuse_kwargs` (learned tokens + EOS, discrete ids, or nothing for a decoding prompt)."""
        if images.dim() != 5:
            raise ValueError(f"images must be [B, T, C, H, W], got shape {tuple(images.shape)}")
        t = images.shape[1]
        image_tokens = self.adapter.encode_images(rearrange(images, "b t c h w -> (b t) c h w"))
        if wrist_images is not None:
            wrist_tokens = self.adapter.encode_images(rearrange(wrist_images, "b t c h w -> (b t) c h w"))
            image_tokens = torch.cat([image_tokens, wrist_tokens], dim=1)
        ids = repeat(text_ids, "b l -> (b t) l", t=t)
        mask = repeat(text_mask.bool(), "b l -> (b t) l", t=t)
        state_tokens = None
        if self.state_encoder is not None:
            if state is None:
                raise ValueError("model.use_state is on but the batch has no `state` [B, T, S]")
            state_tokens = rearrange(self.state_encoder(state), "b t d -> (b t) 1 d")
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
        """Continuous head → (arm `[B, T, N, A-1]`, gripper logits `[B, T, N, 1]`, LM hidden states `[B*T, L, D]`,
        number of attended LM positions)."""
        b, t = images.shape[:2]
        fused = self._robot_sequence(
            images, text_ids, text_mask, wrist_images, state, n_action=self.latent_num, append_eos=True
        )
        hidden, _, _ = self.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        latents = rearrange(hidden[fused.action_mask], "(bt n) d -> bt n d", n=self.latent_num)
        arm, gripper = self.action_head(latents)
        arm = rearrange(arm, "(b t) n a -> b t n a", b=b, t=t)
        gripper = rearrange(gripper, "(b t) n one -> b t n one", b=b, t=t)
        return arm, gripper, hidden, fused.attention_mask.sum()

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
        arm, gripper, hidden, num_tokens = self._action_outputs(
            batch.images, batch.text_ids, batch.text_mask, batch.wrist_images, batch.state
        )
        mask = batch.action_mask if batch.action_mask is not None else torch.ones_like(batch.action[..., 0]).bool()
        # Zero the targets of masked steps first so NaN/inf padding cannot leak into loss or gradients.
        target = torch.where(mask.unsqueeze(-1), batch.action.float(), 0.0)
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
        loss = loss + 0.0 * self.adapter.lm_head(hidden[:1, :1]).float().sum()
        return {
            "loss": loss,
            "loss_arm": loss_arm,
            "loss_gripper": loss_gripper,
            "acc_gripper": acc_gripper,
            "num_tokens": num_tokens,
        }

    def _discrete_labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Action chunk → (ids `[B*T, N*A]` chunk-major, labels: the ids, -100 on masked chunk steps)."""
        assert self.action_tokenizer is not None and batch.action is not None
        mask = batch.action_mask if batch.action_mask is not None else torch.ones_like(batch.action[..., 0]).bool()
        # Masked steps hold any value (NaN past the episode end): give them a valid id, then ignore it.
        target = torch.where(mask.unsqueeze(-1), batch.action.float(), 0.0)
        ids = self.action_tokenizer.encode_chunk(target)
        labels = torch.where(mask.unsqueeze(-1), ids, IGNORE_INDEX)
        flat = "b t n a -> (b t) (n a)"
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
        return {
            "loss": loss,
            "loss_action_ce": loss_action_ce,
            "acc_action_token": acc,
            "num_tokens": fused.attention_mask.sum(),
        }

    # --- vision-language path ---------------------------------------------------------
    def _vl_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.images.dim() != 5 or batch.images.shape[1] != 1:
            raise ValueError(f"a VL batch needs images [B, 1, C, H, W], got shape {tuple(batch.images.shape)}")
        image_tokens = self.adapter.encode_images(batch.images[:, 0])
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
            arm, gripper = self.action_head(repeat(self.action_token, "d -> 1 n d", n=self.latent_num))
            loss = loss + 0.0 * (arm.float().sum() + gripper.float().sum())
        if self.state_encoder is not None:
            idle = self.state_encoder(torch.zeros(1, self.state_dim, device=image_tokens.device))
            loss = loss + 0.0 * idle.float().sum()
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
        """uint8 images `[B, T, C, H, W]` → (normalised arm chunk `[B, T, N, A-1]`, gripper probability
        `[B, T, N, 1]`). `state` `[B, T, S]` (normalised) is required when `model.use_state` is on.

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
        """Discrete action space: greedy action ids `[B, T, N, A]` (`use_cache=False` is the slow reference)."""
        if self.action_tokenizer is None:
            raise ValueError("decode_action_ids needs model.action_space: discrete")
        b, t = images.shape[:2]
        prompt = self._robot_sequence(images, text_ids, text_mask, wrist_images, state)
        tok = self.action_tokenizer
        decode = greedy_decode if use_cache else greedy_decode_uncached
        n_tokens = self.chunk_size * self.action_dim
        ids = decode(self.adapter, prompt.embeds, prompt.attention_mask, n_tokens, (tok.first_id, tok.vocab_size))
        return rearrange(ids, "(b t) (n a) -> b t n a", b=b, t=t, a=self.action_dim)


def build_model(
    cfg: ModelConfig,
    action_dim: int,
    state_dim: int,
    chunk_size: int = 1,
    torch_dtype: torch.dtype | str | None = None,
) -> RoboVLM:
    """Load the configured backbone through the registry (writing the tiny one first if configured) and wrap it.

    `chunk_size` is `data.fwd_pred_next_n`. Under ZeRO-3 create transformers' `HfDeepSpeedConfig`
    before calling this, so `from_pretrained` loads the backbone partitioned.
    """
    backbone = cfg.backbone
    ensure_tiny_backbone(backbone)
    adapter = load_backbone(backbone.family, backbone.pretrained, backbone.trust_remote_code, torch_dtype)
    if backbone.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    return RoboVLM(cfg, action_dim, state_dim, adapter, chunk_size=chunk_size)
