"""FAST action tokens (π0-FAST): a normalised chunk → per-dimension DCT → scaled integers → BPE tokens, and back.

Why: uniform bins spend one token per dimension per step, and neighbouring steps of a smooth chunk carry
almost the same information. The DCT over the chunk axis puts a smooth chunk's energy into a few low
frequencies; after scaling and rounding most high-frequency coefficients are 0, and byte-pair encoding
(the `tokenizers` library) merges the frequent runs into single tokens, so a chunk costs fewer tokens.

Encoding a chunk `[N, A]` (normalised, the Batch contract: the last G dims binary in {0, 1}):

1. binary dims map to {-1, +1} (so they decode exactly whatever their neighbours do);
2. DCT-II with `norm="ortho"` along the chunk axis, per dimension → coefficients `[N, A]`;
3. `round(scale * coefficient)`, clipped to the integer range seen when fitting;
4. flattened low-frequency first (all dims of frequency 0, then frequency 1 ...), each integer one character;
5. BPE over that string → token ids in `range(vocab_size)`.

Decoding inverts each step; a token sequence whose characters do not make exactly N x A integers (a model may
emit one) is padded with zeros or truncated, and counted in `bad_length`.

Round-trip error bound: rounding moves each coefficient by at most `0.5 / scale`; the orthonormal inverse DCT
then moves each step of a dimension by at most `0.5 sqrt(N) / scale` (`error_bound`: a column of the
orthonormal DCT matrix has unit norm, so Cauchy-Schwarz bounds the sum of its absolute entries by sqrt(N)).
Binary dims are exact while that bound is below 1; the constructor refuses a scale for which it is not.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from scipy.fft import dct, idct
from tokenizers import Tokenizer, models, trainers

FILE_NAME = "fast_tokenizer.json"
FORMAT = "vla_scale.fast_tokenizer/1"
CHAR_BASE = 0x100  # integer min_int is this code point: clear of ASCII whitespace and control characters
MAX_INT_RANGE = 0xD000 - CHAR_BASE  # stay below the UTF-16 surrogate block


def fill_masked_steps(chunks: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Chunks `[..., N, A]` with masked steps (past an episode end, any value) → the last valid step repeated
    there ("hold still"), so the DCT sees a smooth chunk; a chunk without any valid step becomes zeros."""
    chunks = np.array(chunks, dtype=np.float32, copy=True)
    mask = np.asarray(mask, dtype=bool)
    steps = np.arange(mask.shape[-1])
    last = np.maximum.accumulate(np.where(mask, steps, -1), axis=-1)  # index of the latest valid step so far
    filled = np.take_along_axis(chunks, np.maximum(last, 0)[..., None], axis=-2)
    return np.where((last >= 0)[..., None], filled, 0.0).astype(np.float32)


class FastTokenizer:
    """A fitted FAST tokenizer for chunks of `chunk_size` steps x `action_dim` dims (`binary_dims` of them last)."""

    def __init__(
        self,
        bpe: Tokenizer,
        scale: float,
        chunk_size: int,
        action_dim: int,
        binary_dims: int,
        min_int: int,
        max_int: int,
        space: dict[str, Any] | None = None,
    ):
        if scale <= 0:
            raise ValueError(f"FAST scale must be > 0, got {scale}")
        if binary_dims and 0.5 * math.sqrt(chunk_size) / scale >= 1.0:
            raise ValueError(
                f"FAST scale {scale} is too coarse for chunks of {chunk_size} steps: binary dims would not decode "
                f"exactly; use scale > {0.5 * math.sqrt(chunk_size):.3g}"
            )
        if not 0 <= binary_dims <= action_dim:
            raise ValueError(f"binary_dims ({binary_dims}) must be in [0, action_dim={action_dim}]")
        self.bpe = bpe
        self.scale = float(scale)
        self.chunk_size = int(chunk_size)
        self.action_dim = int(action_dim)
        self.binary_dims = int(binary_dims)
        self.min_int, self.max_int = int(min_int), int(max_int)
        self.space = dict(space or {})
        self.bad_length = 0  # decoded sequences that did not hold exactly N x A integers
        self.clipped = 0  # coefficients outside [min_int, max_int] at encode time, clipped into it
        self._ids = {tok: i for tok, i in bpe.get_vocab().items()}
        self._tokens = {i: tok for tok, i in self._ids.items()}

    @property
    def vocab_size(self) -> int:
        """Token ids are `range(vocab_size)` (the BPE alphabet plus its merges)."""
        return self.bpe.get_vocab_size()

    @property
    def error_bound(self) -> float:
        """Largest round-trip error of a regressed value (normalised units) for chunks inside the fitted range."""
        return 0.5 * math.sqrt(self.chunk_size) / self.scale

    @property
    def max_tokens(self) -> int:
        """Most tokens a chunk can take: one per coefficient (the alphabet holds every integer of the range)."""
        return self.chunk_size * self.action_dim

    # --- chunks <-> integers ----------------------------------------------------------------------------------
    def coefficients(self, chunks: np.ndarray, clip: bool = True) -> np.ndarray:
        """Chunks `[M, N, A]` → rounded scaled DCT coefficients `[M, N * A]` (int64), low frequency first."""
        x = np.asarray(chunks, dtype=np.float64)
        if x.ndim != 3 or x.shape[1:] != (self.chunk_size, self.action_dim):
            raise ValueError(f"FAST chunks must be [M, {self.chunk_size}, {self.action_dim}], got {list(x.shape)}")
        x = x.copy()
        g = self.binary_dims
        if g:
            x[..., -g:] = np.where(x[..., -g:] > 0.5, 1.0, -1.0)
        ints = np.rint(dct(x, axis=1, norm="ortho") * self.scale).astype(np.int64).reshape(len(x), -1)
        if clip:
            self.clipped += int(((ints < self.min_int) | (ints > self.max_int)).sum())
            ints = np.clip(ints, self.min_int, self.max_int)
        return ints

    def chunks_from(self, ints: np.ndarray) -> np.ndarray:
        """Coefficients `[M, N * A]` → chunks `[M, N, A]` (float32, binary dims thresholded to {0, 1})."""
        coeffs = np.asarray(ints, dtype=np.float64).reshape(-1, self.chunk_size, self.action_dim) / self.scale
        x = idct(coeffs, axis=1, norm="ortho")
        g = self.binary_dims
        if g:
            x[..., -g:] = (x[..., -g:] > 0).astype(np.float64)
        return x.astype(np.float32)

    def _text(self, ints: np.ndarray) -> str:
        return "".join(chr(CHAR_BASE + int(v) - self.min_int) for v in ints)

    # --- chunks <-> tokens ------------------------------------------------------------------------------------
    def encode(self, chunks: np.ndarray) -> list[list[int]]:
        """Chunks `[M, N, A]` → one list of token ids (in `range(vocab_size)`) per chunk, variable length."""
        return [enc.ids for enc in self.bpe.encode_batch([self._text(row) for row in self.coefficients(chunks)])]

    def decode(self, tokens: list[list[int]]) -> np.ndarray:
        """Token id lists → chunks `[M, N, A]`; unknown ids are skipped, wrong lengths padded with zeros or
        truncated (both counted in `bad_length`)."""
        n = self.chunk_size * self.action_dim
        out = np.zeros((len(tokens), n), dtype=np.int64)
        for i, ids in enumerate(tokens):
            text = "".join(self._tokens.get(int(t), "") for t in ids)
            ints = [ord(c) - CHAR_BASE + self.min_int for c in text]
            if len(ints) != n or any(int(t) not in self._tokens for t in ids):
                self.bad_length += 1
            ints = ints[:n]
            out[i, : len(ints)] = ints
        return self.chunks_from(out)

    # --- fitting and files ------------------------------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        chunks: np.ndarray,
        binary_dims: int,
        scale: float = 10.0,
        vocab_size: int = 1024,
        space: dict[str, Any] | None = None,
    ) -> FastTokenizer:
        """Fit on normalised chunks `[M, N, A]`: the integer range, then BPE merges up to `vocab_size` tokens
        (the alphabet, one character per integer of the range, is always kept whole)."""
        chunks = np.asarray(chunks, dtype=np.float32)
        if chunks.ndim != 3 or not len(chunks):
            raise ValueError(f"FAST fit needs chunks [M, N, A] with M > 0, got {list(chunks.shape)}")
        _, n, a = chunks.shape
        probe = cls(Tokenizer(models.BPE()), scale, n, a, binary_dims, 0, 0, space)
        ints = probe.coefficients(chunks, clip=False)
        lo, hi = int(ints.min()), int(ints.max())
        if hi - lo > MAX_INT_RANGE:
            raise ValueError(
                f"FAST coefficients span {hi - lo + 1} integers at scale {scale}; lower the scale "
                "(are the chunks normalised?)"
            )
        bpe = Tokenizer(models.BPE())
        alphabet = [chr(CHAR_BASE + i) for i in range(hi - lo + 1)]
        trainer = trainers.BpeTrainer(
            vocab_size=max(vocab_size, len(alphabet)), initial_alphabet=alphabet, show_progress=False
        )
        fitted = cls(bpe, scale, n, a, binary_dims, lo, hi, space)
        bpe.train_from_iterator([fitted._text(row) for row in ints], trainer=trainer)
        return cls(bpe, scale, n, a, binary_dims, lo, hi, space)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "scale": self.scale,
            "chunk_size": self.chunk_size,
            "action_dim": self.action_dim,
            "binary_dims": self.binary_dims,
            "min_int": self.min_int,
            "max_int": self.max_int,
            "vocab_size": self.vocab_size,
            "space": self.space,
            "tokenizer": json.loads(self.bpe.to_str()),
        }

    def save(self, path: str | Path) -> Path:
        """One JSON file (written to a temporary name and renamed, so a reader never sees half of it)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> FastTokenizer:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no FAST tokenizer at {path}; fit one with `python -m data_tools fit-fast`")
        data = json.loads(path.read_text())
        if data.get("format") != FORMAT:
            raise ValueError(f"{path} is not a {FORMAT} file (format {data.get('format')!r}); refit it")
        bpe = Tokenizer.from_str(json.dumps(data["tokenizer"]))
        keys = ("scale", "chunk_size", "action_dim", "binary_dims", "min_int", "max_int")
        return cls(bpe, *(data[k] for k in keys), space=data.get("space"))
