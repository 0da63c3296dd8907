"""Frames are stored losslessly by default, source JPEG bytes are copied, and JPEG from pixels is 4:4:4."""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_tools.__main__ import main
from data_tools.writer import ShardWriter
from tests.data_tools.sources import hdf5 as hdf5_src
from tests.data_tools.sources import llava as llava_src
from tests.data_tools.sources import rlds as rlds_src
from tests.data_tools.sources.lerobot import frame as lerobot_frame
from tests.data_tools.sources.lerobot import make_v3
from tests.data_tools.sources.lerobot import png as lerobot_png
from vla_scale.data.format import Episode, Manifest, decode_episode, decode_image, encode_image


def members(folder: Path) -> dict[str, bytes]:
    """Every tar member of every shard, by name."""
    out = {}
    for shard in Manifest.load(folder).shards:
        with tarfile.open(folder / shard.path) as tar:
            out.update({m.name: tar.extractfile(m).read() for m in tar.getmembers()})
    return out


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def colour_checkerboard(size: int = 64) -> np.ndarray:
    """2-px red/green squares: colour detail finer than 4:2:0's half-resolution chroma."""
    yy, xx = np.mgrid[0:size, 0:size]
    img = np.empty((size, size, 3), np.uint8)
    img[(xx // 2 + yy // 2) % 2 == 0] = (220, 40, 40)
    img[(xx // 2 + yy // 2) % 2 == 1] = (40, 200, 60)
    return img


def mean_abs_error(data: bytes, img: np.ndarray) -> float:
    return float(np.abs(decode_image(data).astype(int) - img.astype(int)).mean())


def test_writer_default_is_lossless(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (24, 24, 3), dtype=np.uint8) for _ in range(3)]
    ep = Episode("ep0", "noise", np.zeros((3, 2), np.float32), np.zeros((3, 2), np.float32), {"rgb_static": frames})
    with ShardWriter(tmp_path, "noise", "robot") as writer:  # no image_ext: the default
        writer.write_episode(ep)
    assert Manifest.load(tmp_path).image_encoding == {"rgb_static": "png"}
    (sample,) = [{"__key__": "ep0", **{k.split(".", 1)[1]: v for k, v in members(tmp_path).items()}}]
    back = decode_episode(sample)
    for got, want in zip(back.frames["rgb_static"], frames, strict=True):
        np.testing.assert_array_equal(got, want)


def test_jpeg_from_pixels_is_444(tmp_path: Path) -> None:
    img = colour_checkerboard()
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=95)  # PIL's default: 4:2:0, what was stored before
    err_420 = mean_abs_error(buf.getvalue(), img)
    err_444 = mean_abs_error(encode_image(img, "jpg", 95), img)
    assert err_420 > 20, err_420  # the detail this image is made of is lost in 4:2:0
    assert err_444 < 4 and err_444 < err_420 / 5, (err_444, err_420)
    with Image.open(io.BytesIO(encode_image(img, "jpg"))) as pil:
        assert pil.layer[0][1:3] == pil.layer[1][1:3]  # luma and chroma sampled alike


def test_rlds_jpeg_bytes_copied_png_kept(tmp_path: Path) -> None:
    """RLDS: the static camera is JPEG in the source, the wrist one PNG."""
    src = rlds_src.make_rlds(tmp_path / "src")
    lengths = [n for file in rlds_src.LENGTHS for n in file]
    for mode, wrist_encoding in (("auto", "png"), ("jpg", "jpg q90 4:4:4")):
        out = tmp_path / mode
        extra = [] if mode == "auto" else ["--image-ext", "jpg", "--jpeg-quality", "90"]
        assert main(["convert", "rlds", str(src), str(out), "--no-binary-gripper", *extra]) == 0
        manifest = Manifest.load(out)
        assert manifest.image_encoding == {"rgb_static": "jpg (source bytes)", "rgb_wrist": wrist_encoding}
        stored = members(out)
        for e, length in enumerate(lengths):
            for t in range(length):
                source = rlds_src.encoded(rlds_src.frame(e, t, 0), "JPEG")
                assert sha(stored[f"ep{e:06d}.rgb_static.{t:04d}.jpg"]) == sha(source)
                wrist = stored[f"ep{e:06d}.rgb_wrist.{t:04d}.{'png' if mode == 'auto' else 'jpg'}"]
                if mode == "auto":  # PNG source, lossless: bit-identical frames
                    np.testing.assert_array_equal(decode_image(wrist), rlds_src.frame(e, t, 1))
                else:
                    assert mean_abs_error(wrist, rlds_src.frame(e, t, 1)) < 2


def test_lerobot_png_images_round_trip_exactly(tmp_path: Path) -> None:
    """LeRobot image columns hold PNG files: copied, so frames decode bit-identical; video frames become PNG."""
    out = tmp_path / "out"
    assert main(["convert", "lerobot", str(make_v3(tmp_path / "v3")), str(out), "--limit", "2"]) == 0
    assert Manifest.load(out).image_encoding == {"rgb_static": "png", "rgb_wrist": "png"}
    stored = members(out)
    for e, length in enumerate((5, 7)):
        for t in range(length):
            data = stored[f"ep{e:06d}.rgb_wrist.{t:04d}.png"]
            assert sha(data) == sha(lerobot_png(lerobot_frame(e, t, 1)))
            np.testing.assert_array_equal(decode_image(data), lerobot_frame(e, t, 1))


def test_aloha_jpeg_rows_copied_without_padding(tmp_path: Path) -> None:
    src = hdf5_src.make_aloha(tmp_path / "aloha", compress=True)
    out = tmp_path / "out"
    assert (
        main(["convert", "hdf5", str(src), str(out), "--instruction", "transfer the cube", "--no-binary-gripper"]) == 0
    )
    manifest = Manifest.load(out)
    assert set(manifest.image_encoding.values()) == {"jpg (source bytes)"}
    stored = members(out)
    for ep, length in enumerate(hdf5_src.ALOHA_LENGTHS):
        for cam_i, cam in enumerate(("rgb_static", "rgb_wrist")):
            for t in range(length):
                want = hdf5_src.jpeg(hdf5_src.frame(ep, t, cam_i))  # padded rows in the file: cut back to this
                assert sha(stored[f"episode_{ep}.{cam}.{t:04d}.jpg"]) == sha(want), (ep, cam, t)


def test_png_mode_decodes_source_jpeg_once(tmp_path: Path) -> None:
    src = hdf5_src.make_aloha(tmp_path / "aloha", compress=True)
    out = tmp_path / "out"
    assert (
        main(["convert", "hdf5", str(src), str(out), "--instruction", "x", "--image-ext", "png", "--no-binary-gripper"])
        == 0
    )
    stored = members(out)
    want = decode_image(hdf5_src.jpeg(hdf5_src.frame(0, 0, 0)))
    np.testing.assert_array_equal(decode_image(stored["episode_0.rgb_static.0000.png"]), want)
    assert Manifest.load(out).image_encoding == {"rgb_static": "png", "rgb_wrist": "png"}


def test_llava_image_files_copied(tmp_path: Path) -> None:
    src = llava_src.make_llava(tmp_path)
    out = tmp_path / "out"
    assert main(["convert", "llava", str(src), str(out), "--image-folder", str(src.parent / "images")]) == 0
    assert Manifest.load(out).image_encoding == {"image": "jpg (source bytes) + png"}
    stored = members(out)
    (jpg_name,) = [n for n in stored if n.endswith(".jpg")]
    assert sha(stored[jpg_name]) == sha((src.parent / "images" / "coco" / "003.jpg").read_bytes())


@pytest.mark.parametrize("bad", [b"not an image", b"\xff\xd8\xff\xe0 truncated jpeg"])
def test_undecodable_source_bytes_are_refused(tmp_path: Path, bad: bytes) -> None:
    ep = Episode("ep0", "x", np.zeros((1, 2), np.float32), np.zeros((1, 2), np.float32), {"rgb_static": [bad]})
    with pytest.raises(ValueError, match="ep0: camera rgb_static: undecodable image"):
        with ShardWriter(tmp_path, "bad", "robot") as writer:
            writer.write_episode(ep)
