"""A LLaVA-style JSON + image folder arrives as VL samples with conversations intact; bad images are counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.convert import llava
from data_tools.convert.common import PROGRESS_FILE
from tests.data_tools.sources.llava import GOOD, conversation, expected_image, image, make_llava
from vla_scale.data.format import Manifest, decode_vl


def read_samples(out: Path) -> list:
    manifest = Manifest.load(out)
    urls = [str(out / s.path) for s in manifest.shards]
    return [decode_vl(s) for s in wds.WebDataset(urls, shardshuffle=False, empty_check=False)]


def convert(src: Path, out: Path, *extra: str) -> int:
    args = ["convert", "llava", str(src), str(out), "--image-folder", str(src.parent / "images")]
    return main([*args, "--image-ext", "png", "--episodes-per-shard", "2", *extra])


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llava(tmp_path_factory.mktemp("llava"))


def test_conversations_and_images_intact(src: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert convert(src, out) == 0
    manifest = Manifest.load(out)
    assert manifest.kind == "vl" and manifest.num_samples == len(GOOD) and len(manifest.shards) == 3
    assert manifest.image_size == []  # sizes differ
    assert manifest.extra["skipped"]["count"] == 2
    assert manifest.extra["text_only_or_multi_image_entries"] == 1
    assert not (out / "stats.json").exists() and not (out / PROGRESS_FILE).exists()
    got = read_samples(out)
    assert [s.key for s in got] == [f"{i:09d}_img_{i}" for i in GOOD]
    for i, sample in zip(GOOD, got, strict=True):
        assert sample.conversations == conversation(i)
        np.testing.assert_array_equal(sample.image, expected_image(src.parent, i))
    printed = capsys.readouterr().out
    assert "skipped 2" in printed and "002.png: image not found" in printed and "004.png: undecodable" in printed
    assert "left out 1 entries without a single image" in printed


def test_jpeg_output_within_tolerance(src: Path, tmp_path: Path) -> None:
    assert convert(src, tmp_path / "out", "--image-ext", "jpg", "--limit", "1") == 0
    (sample,) = read_samples(tmp_path / "out")
    assert np.abs(sample.image.astype(int) - image(0)).mean() < 4


def test_strict_stops_at_missing_image(src: Path, tmp_path: Path, capsys) -> None:
    assert convert(src, tmp_path / "out", "--strict") == 2
    err = capsys.readouterr().err
    assert "002.png: image not found" in err and "--strict" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_workers_give_identical_shards(src: Path, tmp_path: Path) -> None:
    assert convert(src, tmp_path / "w1", "--image-ext", "jpg") == 0
    assert convert(src, tmp_path / "w2", "--image-ext", "jpg", "--workers", "2") == 0
    names = sorted(p.name for p in (tmp_path / "w1").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "w2").iterdir())
    assert all((tmp_path / "w1" / n).read_bytes() == (tmp_path / "w2" / n).read_bytes() for n in names)


def test_resume_keeps_skip_count(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert convert(src, tmp_path / "full") == 0
    real = llava.load_sample

    def failing(source: llava.Source, strict: bool):
        if source.index == 6:
            raise RuntimeError("simulated crash")
        return real(source, strict)

    monkeypatch.setattr(llava, "load_sample", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        convert(src, tmp_path / "out")
    progress = json.loads((tmp_path / "out" / PROGRESS_FILE).read_text())
    assert progress["skipped"]["count"] == 2 and progress["episodes_done"] == 6  # 2 shards; 2 and 4 skipped
    monkeypatch.setattr(llava, "load_sample", real)
    assert convert(src, tmp_path / "out", "--resume") == 0
    assert Manifest.load(tmp_path / "out") == Manifest.load(tmp_path / "full")
    for shard in Manifest.load(tmp_path / "full").shards:
        assert (tmp_path / "out" / shard.path).read_bytes() == (tmp_path / "full" / shard.path).read_bytes()


def test_bad_input_gives_clear_errors(src: Path, tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": [{"from": "user", "value": "hi"}]}]))
    (tmp_path / "images").mkdir()
    assert convert(bad, tmp_path / "a") == 2
    assert "entry 0 (id 'x'): turn 0 must be" in capsys.readouterr().err
    conv = [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "hello"}]
    bad.write_text(json.dumps([{"id": "x", "image": "a.png", "conversations": conv}]))
    assert convert(bad, tmp_path / "c") == 2  # every image missing: nothing to write
    assert "all 1 sources were skipped" in capsys.readouterr().err
    assert not (tmp_path / "c" / "manifest.json").exists()
    bad.write_text("{not json")
    assert convert(bad, tmp_path / "b") == 2
    assert "not valid JSON" in capsys.readouterr().err
