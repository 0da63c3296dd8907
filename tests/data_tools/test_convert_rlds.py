"""An RLDS/TFDS folder, written here as framed protobufs (no TensorFlow), arrives intact in vla_scale shards."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image
from tfrecord_encoder import example, feature, write_tfrecord

from data_tools.__main__ import main
from data_tools.convert import rlds
from data_tools.convert.common import PROGRESS_FILE
from vla_scale.data.format import Manifest, decode_episode

SIZE = 32
LENGTHS = ((4, 6), (5,))  # episodes per tfrecord file
NAME = "toy_rlds"


def feature_example(values: dict[str, list]) -> bytes:
    return example({k: feature(v) for k, v in values.items()})


# -- the fixture dataset ---------------------------------------------------------------------


def frame(ep: int, t: int, cam: int) -> np.ndarray:
    img = np.empty((SIZE, SIZE, 3), dtype=np.uint8)
    base = (ep * 50 + t * 31 + cam * 90) % 200
    img[:16], img[16:] = (base, 255 - base, 60), (20 + base // 2, 90, 200 - base // 3)
    return img


def encoded(img: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def state(ep: int, length: int) -> np.ndarray:
    return (np.arange(length * 8, dtype=np.float32).reshape(length, 8) * 0.5 + ep).astype(np.float32)


def action(ep: int, length: int) -> np.ndarray:
    return (np.cos(np.arange(length * 7, dtype=np.float32) + ep).reshape(length, 7)).astype(np.float32)


def instruction(ep: int) -> str:
    return f"put the cup {ep} in the sink ✓"


def make_rlds(root: Path) -> Path:
    """`<root>/toy_rlds/1.0.0/` with two train files (3 episodes) and one val file."""
    folder = root / NAME / "1.0.0"
    folder.mkdir(parents=True)
    tensor = {"pythonClassName": "tensorflow_datasets.core.features.tensor_feature.Tensor"}
    step = {
        "action": {**tensor, "tensor": {"shape": {"dimensions": ["7"]}, "dtype": "float32"}},
        "is_first": {**tensor, "tensor": {"shape": {}, "dtype": "bool"}},
        "language_instruction": {**tensor, "tensor": {"shape": {}, "dtype": "string"}},
        "observation": {
            "featuresDict": {
                "features": {
                    "image": {
                        "image": {"shape": {"dimensions": [str(SIZE), str(SIZE), "3"]}, "encodingFormat": "jpeg"}
                    },
                    "wrist_image": {"image": {"shape": {"dimensions": [str(SIZE), str(SIZE), "3"]}}},
                    "state": {**tensor, "tensor": {"shape": {"dimensions": ["8"]}, "dtype": "float32"}},
                }
            }
        },
    }
    features = {
        "featuresDict": {"features": {"steps": {"sequence": {"feature": {"featuresDict": {"features": step}}}}}}
    }
    (folder / "features.json").write_text(json.dumps(features))
    (folder / "dataset_info.json").write_text(json.dumps({"name": NAME, "version": "1.0.0", "splits": []}))
    ep = 0
    for f, lengths in enumerate(LENGTHS):
        records = []
        for length in lengths:
            records.append(
                feature_example(
                    {
                        "steps/observation/image": [encoded(frame(ep, t, 0), "JPEG") for t in range(length)],
                        "steps/observation/wrist_image": [encoded(frame(ep, t, 1), "PNG") for t in range(length)],
                        "steps/observation/state": state(ep, length).ravel().tolist(),
                        "steps/action": action(ep, length).ravel().tolist(),
                        "steps/language_instruction": [instruction(ep).encode()] * length,
                        "steps/is_first": [1] + [0] * (length - 1),
                        "episode_metadata/file_path": [f"/raw/ep{ep}.h5".encode()],
                    }
                )
            )
            ep += 1
        write_tfrecord(folder / f"{NAME}-train.tfrecord-{f:05d}-of-00002", records)
    val = feature_example({"steps/action": [0.0] * 7, "steps/is_first": [1]})
    write_tfrecord(folder / f"{NAME}-val.tfrecord-00000-of-00001", [val])
    return folder


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rlds(tmp_path_factory.mktemp("rlds"))


def convert(src: Path, out: Path, *extra: str) -> int:
    return main(["convert", "rlds", str(src), str(out), "--image-ext", "png", "--episodes-per-shard", "2", *extra])


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
