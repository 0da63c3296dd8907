"""Discrete actions: each normalised action dimension binned onto reserved vocabulary ids (OpenVLA / RoboVLMs style).

`n_bin` uniform bins cover `[min_action, max_action]`; values outside are clipped to the
edge bins. Bin `i` is the token id `vocab_size - n_bin + i`: the LAST `n_bin` ids of the
language model's base vocabulary are given over to actions, so no new embedding rows are
needed and the pretrained LM head already produces logits for them. Those ids are the
rarest BPE merges in practice; their text meaning is overwritten by fine-tuning.

Decoding maps an id back to its bin centre, so encode → decode is off by at most half a
bin width (`(max_action - min_action) / (2 n_bin)`) inside the range.

Robot chunks (`encode_chunk` / `decode_chunk`) follow the Batch contract: the last `binary_dims`
dims are binary grippers in {0, 1} (as many as the dataset declares: 0, 1 or more). They are mapped
to {min_action, max_action} before binning, so open and closed always land in the two extreme bins
whatever `n_bin` and the range are; decoding maps back and thresholds at the middle of the range.
Every dim, binary or not, is one token.
"""

from __future__ import annotations

from typing import Any

import torch


class ActionTokenizer:
    """Uniform binning of actions onto the last `n_bin` ids of a vocabulary of `vocab_size` tokens.

    `vocab` is the vocabulary size, or a tokenizer whose base `vocab_size` (added special tokens
    excluded, as in OpenVLA) is used, so chat/image special tokens appended after it stay untouched.
    """

    def __init__(self, vocab: int | Any, n_bin: int = 256, min_action: float = -1.0, max_action: float = 1.0):
        vocab_size = vocab if isinstance(vocab, int) else int(vocab.vocab_size)
        if n_bin < 2:
            raise ValueError(f"model.discrete.n_bin must be >= 2, got {n_bin}")
        if not min_action < max_action:
            raise ValueError(f"model.discrete.min_action ({min_action}) must be < max_action ({max_action})")
        if n_bin >= vocab_size:
            raise ValueError(
                f"model.discrete.n_bin ({n_bin}) must be smaller than the LM vocabulary ({vocab_size} tokens): "
                "the action bins take over the last n_bin ids"
            )
        self.vocab_size = vocab_size
        self.n_bin = n_bin
        self.min_action = float(min_action)
        self.max_action = float(max_action)
        self.bin_width = (self.max_action - self.min_action) / n_bin

    @property
    def first_id(self) -> int:
        """Id of bin 0; the action ids are `range(first_id, vocab_size)`."""
        return self.vocab_size - self.n_bin

    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Actions `[..., A]` (any number of dims) → token ids `[..., A]` (int64), clipped into the range."""
        scaled = (actions.float() - self.min_action) / self.bin_width
        scaled = torch.nan_to_num(scaled, nan=0.0)  # a NaN (padding past an episode end) still gets a valid id
        bins = torch.floor(scaled).clamp(0, self.n_bin - 1).long()  # x == max_action goes to the last bin
        return bins + self.first_id

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[..., A]` → bin centres `[..., A]` (float32); ids outside the action range are clipped."""
        bins = (ids.long() - self.first_id).clamp(0, self.n_bin - 1)
        return self.min_action + (bins.float() + 0.5) * self.bin_width

    def encode_chunk(self, action: torch.Tensor, binary_dims: int = 1) -> torch.Tensor:
        """Batch-contract actions `[..., A]` (regressed dims, then `binary_dims` grippers in {0, 1}) → ids
        `[..., A]`."""
        regressed = action.shape[-1] - binary_dims
        gripper = self.min_action + action[..., regressed:].float() * (self.max_action - self.min_action)
        return self.encode(torch.cat([action[..., :regressed].float(), gripper], dim=-1))

    def decode_chunk(self, ids: torch.Tensor, binary_dims: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids `[..., A]` → (regressed bin centres `[..., A-G]`, grippers `[..., G]` as 1.0 (closed) or 0.0).

        A gripper is a hard 0/1, not a probability: greedy decoding picks one bin.
        """
        values = self.decode(ids)
        regressed = values.shape[-1] - binary_dims
        gripper = (values[..., regressed:] - self.min_action) / (self.max_action - self.min_action)
        return values[..., :regressed], (gripper > 0.5).float()
