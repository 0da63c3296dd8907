"""An RLDS/TFDS folder, written here as framed protobufs (no TensorFlow), arrives intact in vla_scale shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.convert import rlds
from data_tools.convert.common import PROGRESS_FILE
from tests.data_tools.sources.rlds import LENGTHS, NAME, action, frame, instruction, make_rlds, state
from vla_scale.data.format import Manifest, decode_episode


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rlds(tmp_path_factory.mktemp("rlds"))


def convert(src: Path, out: Path, *extra: str) -> int:
    """The fixture's actions are continuous in every dimension (no binary gripper): declared so."""
    args = ["--image-ext", "png", "--episodes-per-shard", "2", "--no-binary-gripper", *extra]
    return main(["convert", "rlds", str(src), str(out), *args])


def read_episodes(out: Path) -> list:
    urls = [str(out / s.path) for s in Manifest.load(out).shards]
    return [decode_episode(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def test_episodes_arrive_intact(src: Path, tmp_path: Path) -> None:
    assert convert(src.parent, tmp_path / "out") == 0  # SRC = <name>: the version folder is found
    manifest = Manifest.load(tmp_path / "out")
    lengths = [n for file in LENGTHS for n in file]
    assert manifest.num_samples == 3 and len(manifest.shards) == 2
    assert sum(s.frames for s in manifest.shards) == sum(lengths)
    assert (manifest.cameras, manifest.action_dim, manifest.state_dim) == (["rgb_static", "rgb_wrist"], 7, 8)
    assert manifest.name == NAME
    assert set(json.loads((tmp_path / "out" / "stats.json").read_text())) == {"action", "state"}
    for e, ep in enumerate(read_episodes(tmp_path / "out")):
        assert ep.key == f"ep{e:06d}" and ep.instruction == instruction(e)
        assert ep.meta["file_path"] == f"/raw/ep{e}.h5"
        np.testing.assert_array_equal(ep.state, state(e, lengths[e]))
        np.testing.assert_array_equal(ep.action, action(e, lengths[e]))
        for t in range(lengths[e]):
            diff = np.abs(ep.frames["rgb_static"][t].astype(int) - frame(e, t, 0))
            assert diff[np.r_[2:12, 20:30]].max() <= 8, (e, t)  # JPEG: block interiors, away from the edge
            np.testing.assert_array_equal(ep.frames["rgb_wrist"][t], frame(e, t, 1))


def test_workers_identical_and_resume(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert convert(src, tmp_path / "w1", "--episodes-per-shard", "1") == 0
    assert convert(src, tmp_path / "w2", "--episodes-per-shard", "1", "--workers", "2") == 0
    names = [s.path for s in Manifest.load(tmp_path / "w1").shards]
    assert [(tmp_path / "w1" / n).read_bytes() for n in names] == [(tmp_path / "w2" / n).read_bytes() for n in names]

    real = rlds.load_episode

    def crash_on_last(source: tuple, **kw):
        if source[2] == 2:
            raise KeyboardInterrupt
        return real(source, **kw)

    out = tmp_path / "resumed"
    monkeypatch.setattr(rlds, "load_episode", crash_on_last)
    assert convert(src, out, "--episodes-per-shard", "1") == 130
    assert json.loads((out / PROGRESS_FILE).read_text())["episodes_done"] == 2
    monkeypatch.setattr(rlds, "load_episode", real)
    assert convert(src, out, "--episodes-per-shard", "1", "--resume") == 0
    for name in [*names, "stats.json", "manifest.json"]:
        assert (out / name).read_bytes() == (tmp_path / "w1" / name).read_bytes()


def test_split_and_key_options(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "val"
    args = ["--split", "val", "--state-key", "action", "--instruction-key", "", "--camera", "rgb_static=x"]
    assert convert(src, out, *args) == 2
    assert "--camera rgb_static: key 'x' is not in the records" in capsys.readouterr().err
    assert convert(src, tmp_path / "nosplit", "--split", "test") == 2
    assert "available splits: ['train', 'val']" in capsys.readouterr().err


def test_corrupt_record_is_a_clear_error(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad" / NAME / "1.0.0"
    bad.mkdir(parents=True)
    for f in src.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    path = bad / f"{NAME}-train.tfrecord-00001-of-00002"
    raw = bytearray(path.read_bytes())
    raw[100] ^= 0xFF
    path.write_bytes(bytes(raw))
    assert convert(bad, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert f"{path}: corrupt record data at byte offset 0" in err
    assert not (tmp_path / "out" / "manifest.json").exists()
