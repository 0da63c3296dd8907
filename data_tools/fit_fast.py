"""`python -m data_tools fit-fast DATASET_DIR --chunk N [--vocab-size V] [--scale S] [--out PATH]`.

Why: `model.discrete.tokenizer: fast` needs a FAST tokenizer (DCT + BPE, vla_scale/model/fast_tokenizer.py)
fitted on the chunks the run trains on. This cuts every episode into the training chunks (frame t predicts
actions t .. t+N-1), normalised with the dataset's stats.json and declared spaces exactly as the data stream
does, with the steps past an episode end holding the last action (as training encodes them), fits the
tokenizer, writes `fast_tokenizer.json` beside stats.json and prints the round-trip error and token counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from data_tools.shards import iter_dataset
from vla_scale.data.format import FormatError, Manifest, decode_episode_arrays, load_stats
from vla_scale.data.locations import is_remote
from vla_scale.data.normalize import Normalizer
from vla_scale.data.window import chunk_actions
from vla_scale.model.fast_tokenizer import FILE_NAME, FastTokenizer, fill_masked_steps


def training_chunks(folder: str | Path, chunk: int) -> tuple[np.ndarray, np.ndarray, Normalizer]:
    """Every frame's normalised chunk `[M, N, A]` (masked steps filled), its step mask `[M, N]`, the normaliser."""
    folder = Path(folder)
    manifest = Manifest.load(folder)
    if manifest.kind != "robot":
        raise FormatError(f"{folder} is a {manifest.kind} dataset; FAST tokenizers are fitted on robot datasets")
    normalizer = Normalizer(load_stats(folder), manifest.robot_spaces)
    chunks, masks = [], []
    for _, sample in iter_dataset(folder, manifest):
        _, action, _ = decode_episode_arrays(sample)
        c, m = chunk_actions(normalizer.normalize_action(action.astype(np.float32)), chunk)
        chunks.append(fill_masked_steps(c, m))
        masks.append(m)
    if not chunks:
        raise FormatError(f"{folder}: the shards hold no episodes; nothing to fit")
    return np.concatenate(chunks), np.concatenate(masks), normalizer


def round_trip_report(
    tok: FastTokenizer, chunks: np.ndarray, mask: np.ndarray, normalizer: Normalizer
) -> dict[str, float]:
    """Encode → decode every chunk: abs error over the real (unmasked) regressed values, normalised and in robot
    units (the binary dims' mismatches counted apart), and tokens per chunk."""
    tokens = tok.encode(chunks)
    tok.bad_length = 0
    decoded = tok.decode(tokens)
    r = tok.action_dim - tok.binary_dims
    err = np.abs(decoded[..., :r] - chunks[..., :r])[mask]
    raw = normalizer.unnormalize_action(chunks[..., :r], chunks[..., r:])
    raw_back = normalizer.unnormalize_action(decoded[..., :r], decoded[..., r:])
    regressed = list(normalizer.spaces.action.regressed)
    raw_err = np.abs(raw_back - raw)[..., regressed][mask]
    lengths = np.array([len(t) for t in tokens])
    return {
        "chunks": float(len(chunks)),
        "mean_abs_norm": float(err.mean()) if err.size else 0.0,
        "max_abs_norm": float(err.max()) if err.size else 0.0,
        "mean_abs_robot": float(raw_err.mean()) if raw_err.size else 0.0,
        "max_abs_robot": float(raw_err.max()) if raw_err.size else 0.0,
        "binary_mismatches": float((decoded[..., r:] != chunks[..., r:])[mask].sum()),
        "bad_length": float(tok.bad_length),
        "mean_tokens": float(lengths.mean()),
        "max_tokens": float(lengths.max()),
        "bins_tokens": float(tok.chunk_size * tok.action_dim),
    }


def fit_fast(
    folder: str | Path, chunk: int, vocab_size: int = 256, scale: float = 10.0, out: str | Path | None = None
) -> tuple[Path, dict[str, float]]:
    """Fit, save (default DATASET/fast_tokenizer.json) and report; returns the file and the report."""
    if is_remote(str(folder)):
        raise ValueError(
            f"{folder}: fit-fast reads a local dataset folder, not a URL; copy the dataset (manifest.json, "
            "stats.json, shards) to a local folder, fit there, and --out the file the run's "
            "model.discrete.fast_path names"
        )
    folder = Path(folder)
    if chunk < 1:
        raise ValueError(f"--chunk must be >= 1, got {chunk}")
    chunks, mask, normalizer = training_chunks(folder, chunk)
    spaces = normalizer.spaces
    space = {
        "dataset": Manifest.load(folder).name,
        "normalization": spaces.normalization,
        "regressed": list(spaces.action.regressed),
        "binary": list(spaces.action.binary),
    }
    tok = FastTokenizer.fit(chunks, len(spaces.action.binary), scale=scale, vocab_size=vocab_size, space=space)
    report = round_trip_report(tok, chunks, mask, normalizer)
    tok.space["round_trip"] = report
    path = tok.save(Path(out) if out else folder / FILE_NAME)
    return path, report


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools fit-fast`."""
    p = subparsers.add_parser(
        "fit-fast",
        help="fit a FAST (DCT + BPE) action tokenizer on a robot dataset's training chunks",
        description="Fit the FAST action tokenizer that model.discrete.tokenizer: fast trains with and write "
        f"{FILE_NAME} beside stats.json; prints the round-trip error and tokens per chunk.",
    )
    p.add_argument("dataset", metavar="DATASET_DIR", help="robot dataset folder with manifest.json and stats.json")
    p.add_argument("--chunk", type=int, required=True, help="chunk length N (the run's data.fwd_pred_next_n)")
    p.add_argument("--vocab-size", type=int, default=256, help="BPE vocabulary size (LM ids it takes over)")
    p.add_argument("--scale", type=float, default=10.0, help="DCT coefficients are multiplied by it, then rounded")
    p.add_argument("--out", default=None, help=f"where to write (default DATASET_DIR/{FILE_NAME})")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    path, r = fit_fast(args.dataset, args.chunk, args.vocab_size, args.scale, args.out)
    tok = FastTokenizer.load(path)
    print(f"fitted on {int(r['chunks'])} chunks of {tok.chunk_size} steps x {tok.action_dim} dims, scale {tok.scale:g}")
    print(f"vocabulary: {tok.vocab_size} tokens (integers {tok.min_int}..{tok.max_int})")
    print(
        f"round-trip abs error, normalised: mean {r['mean_abs_norm']:.5f} max {r['max_abs_norm']:.5f} "
        f"(bound {tok.error_bound:.5f}); robot units: mean {r['mean_abs_robot']:.6g} max {r['max_abs_robot']:.6g}"
    )
    print(f"binary dims wrong: {int(r['binary_mismatches'])}; sequences of the wrong length: {int(r['bad_length'])}")
    print(f"tokens per chunk: mean {r['mean_tokens']:.2f} max {int(r['max_tokens'])} (bins: {int(r['bins_tokens'])})")
    print(f"wrote {path}")
    return 0
