"""FAST tokenizer (DCT + BPE): round trip within the bound 0.5 sqrt(N) / scale on real chunks, binary dims exact,
wrong-length sequences repaired and counted, the file round trip, bad settings refused."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from data_tools.fit_fast import training_chunks
from vla_scale.model.fast_tokenizer import FastTokenizer, fill_masked_steps


def random_chunks(m: int, n: int, a: int, seed: int = 0, low: float = -2.0, high: float = 2.0) -> np.ndarray:
    """Rough (not smooth) chunks, the worst case for the DCT: arm dims uniform, the last dim a binary gripper."""
    rng = np.random.default_rng(seed)
    chunks = rng.uniform(low, high, (m, n, a)).astype(np.float32)
    chunks[..., -1] = rng.integers(0, 2, (m, n))
    return chunks


@pytest.mark.parametrize("chunk", [2, 8])
def test_round_trip_on_toy_dataset_chunks_is_within_the_bound(toy_data: Path, chunk: int) -> None:
    chunks, mask, _ = training_chunks(toy_data / "robot", chunk)  # normalised as training does, [M, N, 4]
    tok = FastTokenizer.fit(chunks, binary_dims=1, scale=10.0, vocab_size=256)
    assert tok.error_bound == pytest.approx(0.5 * math.sqrt(chunk) / 10.0)
    tokens = tok.encode(chunks)
    assert all(0 <= t < tok.vocab_size for row in tokens for t in row)
    decoded = tok.decode(tokens)
    assert tok.bad_length == 0 and tok.clipped == 0
    err = np.abs(decoded[..., :3] - chunks[..., :3])
    assert err.max() <= tok.error_bound + 1e-6
    assert err.max() > 0.2 * tok.error_bound  # the bound is not vacuous: rounding does move values
    np.testing.assert_array_equal(decoded[..., 3], chunks[..., 3])  # the gripper exactly
    lengths = [len(t) for t in tokens]
    assert max(lengths) <= tok.max_tokens == chunk * 4
    if chunk == 8:  # smooth chunks compress: fewer tokens than one per dim per step on average
        assert np.mean(lengths) < 0.5 * chunk * 4, np.mean(lengths)


def test_rough_chunks_stay_within_the_bound_and_every_binary_dim_is_exact() -> None:
    chunks = random_chunks(500, 6, 5, seed=1)
    chunks[..., -2] = (chunks[..., -2] > 0).astype(np.float32)  # two binary dims
    tok = FastTokenizer.fit(chunks, binary_dims=2, scale=4.0, vocab_size=128)
    decoded = tok.decode(tok.encode(chunks))
    assert np.abs(decoded[..., :3] - chunks[..., :3]).max() <= tok.error_bound + 1e-6
    np.testing.assert_array_equal(decoded[..., 3:], chunks[..., 3:])


def test_wrong_lengths_are_padded_or_truncated_and_counted() -> None:
    chunks = random_chunks(200, 4, 3, seed=2)
    tok = FastTokenizer.fit(chunks, binary_dims=1, vocab_size=64)
    tokens = tok.encode(chunks[:2])
    good = tok.decode(tokens)
    assert tok.bad_length == 0
    short = tok.decode([[], tokens[1]])  # nothing decoded: all-zero coefficients
    assert tok.bad_length == 1 and short.shape == (2, 4, 3)
    np.testing.assert_array_equal(short[0, :, :2], 0.0)
    np.testing.assert_array_equal(short[1], good[1])
    long = tok.decode([tokens[0] + tokens[0], tokens[0] + [tok.vocab_size + 5]])  # truncated / unknown id skipped
    assert tok.bad_length == 3
    np.testing.assert_array_equal(long, good[[0, 0]])


def test_out_of_range_values_are_clipped_and_counted() -> None:
    tok = FastTokenizer.fit(random_chunks(200, 4, 3, seed=3, low=-1, high=1), binary_dims=1, vocab_size=64)
    far = random_chunks(1, 4, 3, seed=4)
    far[..., 0] = 50.0
    decoded = tok.decode(tok.encode(far))
    assert tok.clipped > 0 and decoded[..., 0].max() < 10.0  # saturates at the fitted range instead of failing


def test_save_load_round_trip(tmp_path: Path) -> None:
    chunks = random_chunks(300, 4, 3, seed=5)
    tok = FastTokenizer.fit(chunks, binary_dims=1, scale=8.0, vocab_size=96, space={"normalization": "mean_std"})
    loaded = FastTokenizer.load(tok.save(tmp_path / "fast_tokenizer.json"))
    assert (loaded.scale, loaded.chunk_size, loaded.action_dim, loaded.binary_dims) == (8.0, 4, 3, 1)
    assert loaded.vocab_size == tok.vocab_size and loaded.space == {"normalization": "mean_std"}
    assert loaded.encode(chunks) == tok.encode(chunks)
    np.testing.assert_array_equal(loaded.decode(tok.encode(chunks)), tok.decode(tok.encode(chunks)))


def test_bad_settings_and_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too coarse.*scale > 1"):  # 0.5 sqrt(4) / 1 = 1: grippers could flip
        FastTokenizer.fit(random_chunks(10, 4, 3), binary_dims=1, scale=1.0)
    with pytest.raises(ValueError, match=r"\[M, N, A\]"):
        FastTokenizer.fit(np.zeros((0, 4, 3)), binary_dims=1)
    tok = FastTokenizer.fit(random_chunks(10, 4, 3), binary_dims=1, vocab_size=64)
    with pytest.raises(ValueError, match=r"\[M, 4, 3\]"):
        tok.encode(np.zeros((2, 5, 3)))
    with pytest.raises(FileNotFoundError, match="data_tools fit-fast"):
        FastTokenizer.load(tmp_path / "missing.json")
    (tmp_path / "other.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="refit"):
        FastTokenizer.load(tmp_path / "other.json")


def test_masked_steps_hold_the_last_valid_step() -> None:
    chunks = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
    mask = np.array([[True, True, False, False], [False, False, False, False]])
    filled = fill_masked_steps(chunks, mask)
    np.testing.assert_array_equal(filled[0], chunks[0][[0, 1, 1, 1]])
    np.testing.assert_array_equal(filled[1], 0.0)
