"""The discrete path with FAST tokens (`model.discrete.tokenizer: fast`): same loss and decoding as the bins.

The chunk's FAST tokens (`fast_tokenizer.py`) take the last `vocab_size` ids of the LM's base vocabulary, as
the bins do, and fill the action slot with a variable number of ids, always followed by a supervised EOS:

    [BOS] image [state] instruction f_0 .. f_(K-1) [EOS]       (K varies per chunk)

Rows of a batch are padded to the longest K with negative ids, which `SequenceBuilder.fuse` drops like text
padding, so they are neither attended to nor in the loss. Masked chunk steps (past an episode end) repeat the
last valid step before encoding (`fill_masked_steps`), as the fit command does. Decoding is greedy with the KV
cache over the FAST ids and EOS only, until every row has emitted EOS or `max_tokens` (N x A) ids; the ids are
then decoded back to a chunk. History `post` (one slot per frame's sequence) and `video` (one per window).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.backbones import BackboneAdapter
from vla_scale.model.discrete import DiscreteActions, check_action_ids, greedy_decode, greedy_decode_uncached
from vla_scale.model.fast_tokenizer import FastTokenizer, fill_masked_steps
from vla_scale.model.sequence import chunk_targets

if TYPE_CHECKING:
    from vla_scale.model.robovlm import RoboVLM

PAD_ID = -1  # pads a row's action slot; dropped by `fuse`


class FastActions(DiscreteActions):
    """Labels and decoding of FAST tokens; `ids` (an `ActionTokenizer` over the reserved range) maps FAST token
    k to LM id `ids.first_id + k`."""

    def __init__(
        self, cfg: ModelConfig, adapter: BackboneAdapter, action_dim: int, chunk_size: int, binary_dims: int = 1
    ):
        if cfg.history_type == "pre":
            raise ValueError("model.discrete.tokenizer: fast needs model.history_type post or video")
        self.cfg = cfg
        self.action_dim, self.chunk_size, self.binary_dims = action_dim, chunk_size, binary_dims
        self.fast = FastTokenizer.load(cfg.discrete.fast_path)
        got = (self.fast.chunk_size, self.fast.action_dim, self.fast.binary_dims)
        if got != (chunk_size, action_dim, binary_dims):
            raise ValueError(
                f"the FAST tokenizer {cfg.discrete.fast_path} was fitted on chunks of {got[0]} steps x {got[1]} dims "
                f"({got[2]} binary); this model predicts {chunk_size} x {action_dim} ({binary_dims} binary): refit it "
                "with `python -m data_tools fit-fast`"
            )
        base = int(adapter.tokenizer.vocab_size)
        if self.fast.vocab_size >= base:
            raise ValueError(
                f"the FAST tokenizer {cfg.discrete.fast_path} has {self.fast.vocab_size} tokens, not fewer than the "
                f"LM's {base}-token base vocabulary whose last ids they take: refit with a smaller --vocab-size / scale"
            )
        self.tokenizer = ActionTokenizer(adapter.tokenizer, self.fast.vocab_size)
        what = f"the FAST tokenizer's {self.fast.vocab_size} tokens"
        check_action_ids(adapter, self.tokenizer, what, "refit it with a smaller --vocab-size")
        if adapter.eos_id is None:
            raise ValueError("model.discrete.tokenizer: fast ends each chunk with EOS; this backbone has none")
        self.eos_id = int(adapter.eos_id)
        self.append_eos = True

    def labels(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Chunks → (LM ids `[B', K]`, labels `[B', K]`), K the longest row's token count, `PAD_ID` / -100 after
        a shorter row's last token; B' = B*T (`post`) or B (`video`)."""
        action, mask = chunk_targets(batch, self.cfg.history_type)
        chunks = fill_masked_steps(action.detach().float().cpu().numpy(), mask.cpu().numpy())
        tokens = self.fast.encode(chunks.reshape(-1, self.chunk_size, self.action_dim))
        ids = torch.full((len(tokens), max(map(len, tokens))), PAD_ID, dtype=torch.long)
        for row, toks in enumerate(tokens):
            ids[row, : len(toks)] = torch.tensor(toks, dtype=torch.long) + self.tokenizer.first_id
        ids = ids.to(action.device)
        return ids, torch.where(ids >= 0, ids, IGNORE_INDEX)

    def decode_ids(self, model: RoboVLM, obs: Observation, use_cache: bool = True) -> torch.Tensor:
        """Greedy LM ids `[B, T', K]` (FAST ids, then EOS repeated once a row has ended; `use_cache=False` is the
        slow reference); K <= N x A."""
        decode = greedy_decode if use_cache else greedy_decode_uncached
        prompt = model.robot_sequence(obs)
        id_range = (self.tokenizer.first_id, self.tokenizer.vocab_size)
        ids = decode(model.adapter, prompt.embeds, prompt.attention_mask, self.fast.max_tokens, id_range, self.eos_id)
        return ids.reshape(obs.batch_size, -1, ids.shape[-1])

    def tokens_of(self, ids: torch.Tensor) -> list[list[int]]:
        """LM ids `[..., K]` → FAST token lists, each cut at its first EOS."""
        out = []
        for row in ids.reshape(-1, ids.shape[-1]).tolist():
            row = row[: row.index(self.eos_id)] if self.eos_id in row else row
            out.append([i - self.tokenizer.first_id for i in row])
        return out

    def predict(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded chunks: (regressed dims `[B, T', N, A-G]`, grippers 1.0 / 0.0 `[B, T', N, G]`)."""
        ids = self.decode_ids(model, obs)
        chunks = self.fast.decode(self.tokens_of(ids))
        out = torch.from_numpy(np.ascontiguousarray(chunks)).reshape(*ids.shape[:2], self.chunk_size, -1)
        regressed = self.action_dim - self.binary_dims
        return out[..., :regressed].to(ids.device), out[..., regressed:].to(ids.device)
