"""The discrete action path: action chunks as vocabulary ids, next-token CE, greedy KV-cached decoding.

With `model.action_space: discrete` there are no learnable action tokens and no head: the action
chunk is binned onto reserved vocabulary ids (`ActionTokenizer`, the last `n_bin` ids of the base
vocabulary), which take the action slot, A x N of them per frame, chunk-major (all dims of step 0,
then step 1 ...):

    [BOS] image [state] instruction a(0,0) .. a(0,A-1) a(1,0) .. a(N-1,A-1) [EOS if model.discrete.supervise_eos]

trained with next-token cross-entropy on those ids and decoded greedily at inference. Only the
reserved ids compete at each decoding step (other logits are masked out), so a decoded sequence
always maps back to bins. Prompts come compacted from `SequenceBuilder.fuse` (padding at the end);
they are left-aligned first, so every row's generated tokens follow its own last real token. Adapters
with plain RoPE positions see a row's positions shifted by its padding, which rotary attention does
not notice (it depends on relative positions only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from einops import rearrange

from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.backbones import BackboneAdapter
from vla_scale.model.sequence import chunk_targets

if TYPE_CHECKING:
    from vla_scale.model.robovlm import RoboVLM


def build_action_tokenizer(cfg: ModelConfig, adapter: BackboneAdapter) -> ActionTokenizer:
    """Bins on the last `n_bin` ids of the backbone's base vocabulary, checked against its special tokens."""
    d = cfg.discrete
    tokenizer = ActionTokenizer(adapter.tokenizer, d.n_bin, d.min_action, d.max_action)
    check_action_ids(adapter, tokenizer, f"model.discrete.n_bin={d.n_bin}", "lower n_bin")
    if d.supervise_eos and adapter.eos_id is None:
        raise ValueError("model.discrete.supervise_eos is on but the backbone's tokenizer has no EOS token")
    return tokenizer


def check_action_ids(adapter: BackboneAdapter, ids: ActionTokenizer, what: str, fix: str) -> None:
    """The reserved ids `range(ids.first_id, ids.vocab_size)` must fit the LM's embedding rows and hold no special
    token (bins and FAST tokens both take the last ids of the base vocabulary)."""
    rows = adapter.model.get_input_embeddings().num_embeddings
    if ids.vocab_size > rows:
        raise ValueError(f"tokenizer vocabulary ({ids.vocab_size}) exceeds the LM's {rows} embedding rows")
    specials = {adapter.bos_id, adapter.eos_id, adapter.pad_id, adapter.image_start_id, adapter.image_end_id}
    specials |= set(getattr(adapter.tokenizer, "all_special_ids", []))
    clash = sorted(i for i in specials if i is not None and i >= ids.first_id)
    if clash:
        raise ValueError(
            f"{what} would turn special token ids {clash} into action ids (action ids start at {ids.first_id}); {fix}"
        )


class DiscreteActions:
    """Labels, loss and decoding of the discrete path; `model` is the RoboVLM whose LM predicts the ids."""

    def __init__(
        self, cfg: ModelConfig, adapter: BackboneAdapter, action_dim: int, chunk_size: int, binary_dims: int = 1
    ):
        self.cfg = cfg
        self.action_dim = action_dim
        self.binary_dims = binary_dims  # the last ones of the batch's action dims (the Batch contract)
        self.chunk_size = chunk_size
        self.tokenizer = build_action_tokenizer(cfg, adapter)
        self.append_eos = cfg.discrete.supervise_eos  # FAST chunks always end with a supervised EOS

    def labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Action chunks → (ids chunk-major, labels: the ids, -100 on masked chunk steps): `[B*T, N*A]` under `post`
        (one sequence per frame), else `[B, T', N*A]`, one action slot per predicted frame (`chunk_targets`)."""
        action, mask = chunk_targets(batch, self.cfg.history_type)
        # Masked steps hold any value (NaN past the episode end): give them a valid id, then ignore it.
        target = torch.where(mask.unsqueeze(-1), action.float(), 0.0)
        ids = self.tokenizer.encode_chunk(target, self.binary_dims)
        labels = torch.where(mask.unsqueeze(-1), ids, IGNORE_INDEX)
        flat = "b t n a -> (b t) (n a)" if self.cfg.history_type == "post" else "b t n a -> b t (n a)"
        return rearrange(ids, flat), rearrange(labels, flat)

    def losses(self, model: RoboVLM, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """(loss terms, hidden states `[B', L, D]` for the CLIP regulariser, their action positions `[B', L]`).

        Next-token cross-entropy on the action ids (and EOS if `supervise_eos`); logits only where supervised.
        """
        ids, labels = self.labels(batch)
        fused = model.robot_sequence(
            batch.observation,
            action_ids=ids,
            action_labels=labels,
            append_eos=self.append_eos,
            eos_label=True,
        )
        hidden, _, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        # Labels sit on their own token; position i predicts token i + 1.
        targets = fused.labels[:, 1:]
        supervised = targets != IGNORE_INDEX
        logits = model.adapter.compute_logits(hidden[:, :-1][supervised]).float()  # [M, V]
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
        return out, hidden, fused.action_mask

    def idle_outputs(self, model: RoboVLM) -> list[torch.Tensor]:
        """Nothing: the discrete path has no parameters of its own to keep in the graph on VL batches."""
        return []

    def decode_ids(self, model: RoboVLM, obs: Observation, use_cache: bool = True) -> torch.Tensor:
        """Greedy action ids `[B, T', N, A]` (`use_cache=False` is the slow reference).

        `pre` decodes frame by frame: frame f's prompt holds frames <= f and the ids decoded for the earlier
        frames in their slots (training feeds the true ones there), so it costs T decodes.
        """
        b, t = obs.batch_size, obs.num_frames
        decode = greedy_decode if use_cache else greedy_decode_uncached
        n_tokens = self.chunk_size * self.action_dim
        id_range = (self.tokenizer.first_id, self.tokenizer.vocab_size)
        if self.cfg.history_type == "pre":
            done: torch.Tensor | None = None  # [B, f, N*A]: ids of the frames before f
            for f in range(1, t + 1):
                prompt = model.robot_sequence(obs.frames(0, f), action_ids=done)
                new = decode(model.adapter, prompt.embeds, prompt.attention_mask, n_tokens, id_range)[:, None]
                done = new if done is None else torch.cat([done, new], dim=1)
            return rearrange(done, "b t (n a) -> b t n a", a=self.action_dim)
        prompt = model.robot_sequence(obs)
        ids = decode(model.adapter, prompt.embeds, prompt.attention_mask, n_tokens, id_range)
        if self.cfg.history_type == "video":
            return rearrange(ids, "b (n a) -> b 1 n a", a=self.action_dim)
        return rearrange(ids, "(b t) (n a) -> b t n a", b=b, t=t, a=self.action_dim)

    def predict(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded chunks: (regressed bin centres `[B, T', N, A-G]`, grippers 1.0 (closed bin) or 0.0
        `[B, T', N, G]`)."""
        return self.tokenizer.decode_chunk(self.decode_ids(model, obs), self.binary_dims)


# --- greedy decoding ----------------------------------------------------------------------------------------
def left_align(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's padding to the front (stable: real positions keep their order)."""
    order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # False (padding) sorts first
    return torch.take_along_dim(embeds, order.unsqueeze(-1), dim=1), torch.take_along_dim(mask, order, dim=1)


def _pick(
    adapter: BackboneAdapter, last_hidden: torch.Tensor, id_range: tuple[int, int], stop_id: int | None = None
) -> torch.Tensor:
    """Argmax over the action ids (and `stop_id` if given) only: `[B, D]` → ids `[B]`."""
    lo, hi = id_range
    logits = adapter.compute_logits(last_hidden).float()
    if stop_id is None:
        return logits[:, lo:hi].argmax(dim=-1) + lo
    best = torch.cat([logits[:, lo:hi], logits[:, stop_id : stop_id + 1]], dim=1).argmax(dim=-1)
    return torch.where(best == hi - lo, stop_id, best + lo)


def _after_stop(prev: torch.Tensor, new: torch.Tensor, stop_id: int | None) -> torch.Tensor:
    """A row whose earlier ids `[B, k]` hold `stop_id` keeps emitting it (its later choices are padding)."""
    if stop_id is None or prev.shape[1] == 0:
        return new
    return torch.where(prev.eq(stop_id).any(dim=1), stop_id, new)


def _all_stopped(ids: torch.Tensor, stop_id: int | None) -> bool:
    return stop_id is not None and bool(ids.eq(stop_id).any(dim=1).all())


def _embed(adapter: BackboneAdapter, ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return adapter.embed_tokens(ids).to(like.dtype)


def greedy_decode(
    adapter: BackboneAdapter,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int,
    id_range: tuple[int, int],
    stop_id: int | None = None,
) -> torch.Tensor:
    """Prompt `[B, L, D]` + mask `[B, L]` → `n_tokens` greedy ids `[B, n_tokens]`: one pass over the prompt that
    fills the KV cache, then one token per step, feeding the embedding of the id just chosen.

    With `stop_id` (FAST: EOS) that id competes too, a row repeats it once emitted, and decoding ends early,
    after `K <= n_tokens` steps (`[B, K]`), when every row has emitted it."""
    embeds, mask = left_align(embeds, mask.bool())
    hidden, _, cache = adapter.lm_forward(embeds, mask, use_cache=True, return_logits=False)
    if cache is None:
        raise RuntimeError("the backbone returned no KV cache; call predict_action under model.eval()")
    ids = [_pick(adapter, hidden[:, -1], id_range, stop_id)]
    ones = torch.ones_like(mask[:, :1])
    for _ in range(n_tokens - 1):
        if _all_stopped(torch.stack(ids, dim=1), stop_id):
            break
        mask = torch.cat([mask, ones], dim=1)
        step = _embed(adapter, ids[-1][:, None], embeds)
        hidden, _, cache = adapter.lm_forward(step, mask, past_key_values=cache, use_cache=True, return_logits=False)
        ids.append(_after_stop(torch.stack(ids, dim=1), _pick(adapter, hidden[:, -1], id_range, stop_id), stop_id))
    return torch.stack(ids, dim=1)


def greedy_decode_uncached(
    adapter: BackboneAdapter,
    embeds: torch.Tensor,
    mask: torch.Tensor,
    n_tokens: int,
    id_range: tuple[int, int],
    stop_id: int | None = None,
) -> torch.Tensor:
    """Reference for `greedy_decode`: the whole sequence re-run at every step (quadratic; tests only)."""
    embeds, mask = left_align(embeds, mask.bool())
    ids = torch.empty(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
    for _ in range(n_tokens):
        if ids.shape[1] and _all_stopped(ids, stop_id):
            break
        seq = torch.cat([embeds, _embed(adapter, ids, embeds)], dim=1)
        seq_mask = torch.cat([mask, torch.ones_like(ids, dtype=torch.bool)], dim=1)
        hidden, _, _ = adapter.lm_forward(seq, seq_mask, return_logits=False)
        new = _after_stop(ids, _pick(adapter, hidden[:, -1], id_range, stop_id), stop_id)
        ids = torch.cat([ids, new[:, None]], dim=1)
    return ids
