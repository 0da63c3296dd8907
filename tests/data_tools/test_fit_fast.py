"""`data_tools fit-fast`: fits on the training chunks normalised as training does, writes fast_tokenizer.json beside
stats.json (or --out), prints the round-trip error and tokens per chunk; refuses what it cannot fit."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from data_tools.__main__ import main
from data_tools.fit_fast import fit_fast, training_chunks
from vla_scale.model.fast_tokenizer import FastTokenizer


@pytest.fixture
def robot(toy_data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(toy_data / "robot", tmp_path / "robot"))


def test_chunks_are_the_normalised_training_chunks(toy_data: Path) -> None:
    chunks, mask, normalizer = training_chunks(toy_data / "robot", 4)
    stats = json.loads((toy_data / "robot" / "stats.json").read_text())["action"]
    assert chunks.shape[1:] == (4, 4) and mask[:, 0].all()  # one chunk per frame, its first step always real
    first = chunks[:, 0]  # each frame's own action once: z-scored with the dataset's mean / std (synth: mean_std)
    np.testing.assert_allclose(first[:, :3].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(first[:, :3].std(axis=0), 1.0, atol=1e-3)
    assert set(np.unique(first[:, 3])) == {0.0, 1.0}
    raw = normalizer.unnormalize_action(first[:, :3], first[:, 3:])
    np.testing.assert_allclose(raw[:, :3].mean(axis=0), stats["mean"][:3], atol=1e-5)
    # steps past an episode's end hold its last action
    ends = np.flatnonzero(~mask[:, 1])
    np.testing.assert_array_equal(chunks[ends, 1], chunks[ends, 0])


def test_cli_writes_beside_stats_and_prints_the_error(robot: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["fit-fast", str(robot), "--chunk", "4", "--vocab-size", "128", "--scale", "10"]) == 0
    out = capsys.readouterr().out
    path = robot / "fast_tokenizer.json"
    assert f"wrote {path}" in out and not list(robot.glob("*.tmp"))
    tok = FastTokenizer.load(path)
    assert (tok.chunk_size, tok.action_dim, tok.binary_dims, tok.scale) == (4, 4, 1, 10.0)
    assert tok.space["normalization"] == "mean_std" and tok.space["binary"] == [3]
    norm = re.search(
        r"normalised: mean ([\d.]+) max ([\d.]+) \(bound ([\d.]+)\); robot units: mean (\S+) max (\S+)", out
    )
    assert norm, out
    mean_n, max_n, bound, mean_r, max_r = map(float, norm.groups())
    assert 0 < mean_n <= max_n <= bound == pytest.approx(0.1, abs=1e-5)
    std = np.array(json.loads((robot / "stats.json").read_text())["action"]["std"][:3])
    assert 0 < max_r <= max_n * std.max() * 1.001 and mean_r <= mean_n * std.max()
    tokens = re.search(r"tokens per chunk: mean ([\d.]+) max (\d+) \(bins: 16\)", out)
    assert tokens and 1 <= float(tokens.group(1)) <= int(tokens.group(2)) <= 16, out
    assert "binary dims wrong: 0; sequences of the wrong length: 0" in out
    assert tok.space["round_trip"]["max_abs_norm"] == pytest.approx(max_n, abs=1e-5)


def test_out_option_and_refusals(toy_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path, report = fit_fast(toy_data / "robot", 2, vocab_size=64, out=tmp_path / "f.json")
    assert path == tmp_path / "f.json" and not (toy_data / "robot" / "fast_tokenizer.json").exists()
    assert report["max_abs_norm"] <= FastTokenizer.load(path).error_bound
    assert main(["fit-fast", str(toy_data / "vl"), "--chunk", "2"]) == 2
    assert "robot datasets" in capsys.readouterr().err
    assert main(["fit-fast", str(toy_data / "robot"), "--chunk", "0", "--out", str(tmp_path / "g.json")]) == 2
    assert "--chunk must be >= 1" in capsys.readouterr().err
    assert (
        main(["fit-fast", str(toy_data / "robot"), "--chunk", "4", "--scale", "1", "--out", str(tmp_path / "h")]) == 2
    )
    assert "too coarse" in capsys.readouterr().err
    assert main(["fit-fast", "s3://bucket/robot", "--chunk", "2", "--out", str(tmp_path / "i.json")]) == 2
    assert "fit-fast reads a local dataset folder, not a URL" in capsys.readouterr().err
