"""A LLaVA-style JSON + image folder arrives as VL samples with conversations intact; bad images are counted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data_tools.__main__ import main
from data_tools.convert import llava
from data_tools.convert.common import PROGRESS_FILE
from vla_scale.data.format import Manifest, decode_vl


def image(i: int) -> np.ndarray:
    """Smooth gradients (JPEG-friendly), different per entry; sizes differ per entry too."""
    y, x = np.mgrid[0 : 16 + i, 0:24]
    return np.stack([(x * 9 + i * 20) % 256, (y * 7 + i * 40) % 256, np.full_like(x, 30 * i)], axis=2).astype(np.uint8)


def conversation(i: int) -> list[dict]:
    return [
        {"from": "human", "value": f"<image>\nWhat is in picture {i}? ünïcode ✓"},
        {"from": "gpt", "value": f"A test pattern number {i}."},
        {"from": "human", "value": "And the colour?"},
        {"from": "gpt", "value": "Noise,\n\tmostly."},
    ]


GOOD = (0, 1, 3, 5, 6)  # entries with a readable image; 2 is missing, 4 is corrupt, 7 is text-only


def make_llava(root: Path) -> Path:
    images = root / "images" / "coco"
    images.mkdir(parents=True)
    entries = []
    for i in range(8):
        entry = {"id": f"img.{i}", "image": f"coco/{i:03d}.png", "conversations": conversation(i)}
        if i == 3:  # a JPEG, an RGBA and a grayscale image: all arrive as RGB
            entry["image"] = "coco/003.jpg"
            Image.fromarray(image(i)).save(images / "003.jpg", quality=90)
        elif i == 5:
            Image.fromarray(np.dstack([image(i), np.full(image(i).shape[:2], 255, np.uint8)])).save(images / "005.png")
        elif i == 6:
            Image.fromarray(image(i)[..., 0]).save(images / "006.png")
        elif i == 4:
            (images / "004.png").write_bytes(b"\x89PNG not really")
        elif i == 7:
            del entry["image"]
        elif i != 2:
            Image.fromarray(image(i)).save(images / f"{i:03d}.png")
        entries.append(entry)
    path = root / "llava_mix.json"
    path.write_text(json.dumps(entries, ensure_ascii=False))
    return path


def expected_image(root: Path, i: int) -> np.ndarray:
    if i == 3:
        return np.asarray(Image.open(root / "images" / "coco" / "003.jpg").convert("RGB"))
    if i == 6:
        return np.repeat(image(i)[..., :1], 3, axis=2)
    return image(i)


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
