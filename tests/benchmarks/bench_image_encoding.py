"""Size per frame and decode speed of each way `data_tools` can store a frame (`--image-ext`).

Why: the default went from JPEG 4:2:0 (re-encoding every source, lossy) to lossless PNG for pixels and
unchanged bytes for JPEG sources; this measures what each choice costs on disk and in the reader.

Two sets of frames, each at 64 and 224 px:
- photo: crops of matplotlib's sample photograph (grace_hopper.jpg), resized; detail like a real camera;
- synth: the synthetic tabletop frames of `data_tools synth` (flat-coloured rendered shapes).
Rows: png (what `auto` stores for pixels), jpg 4:4:4 q95 (`--image-ext jpg` on pixels), jpg copied (a
source JPEG stored unchanged, here written as cameras and TFDS write them: q95 4:2:0), and, for reference,
what `--image-ext jpg` stored before: pixels encoded 4:2:0 q95, and a JPEG source decoded and re-encoded
4:2:0 q95 (its error is against the source JPEG's own pixels). Decode = `vla_scale.data.format.decode_image`,
the reader's own call, on one thread; median over rounds, the variants interleaved within each round.

    OMP_NUM_THREADS=1 .venv/bin/python tests/benchmarks/bench_image_encoding.py [--rounds 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable

import matplotlib.cbook
import numpy as np
from bench_common import command_line
from PIL import Image

from data_tools.synth import make_episode
from vla_scale.data.format import decode_image, encode_image


def photo_frames(size: int, count: int, seed: int = 0) -> list[np.ndarray]:
    """Random crops (1/4 to 3/4 of the short side) of the sample photo, resized to `size` px."""
    with Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as pil:
        photo = pil.convert("RGB")
    rng = np.random.default_rng(seed)
    w, h = photo.size
    frames = []
    for _ in range(count):
        side = int(rng.integers(min(w, h) // 4, 3 * min(w, h) // 4))
        x, y = int(rng.integers(0, w - side)), int(rng.integers(0, h - side))
        crop = photo.crop((x, y, x + side, y + side)).resize((size, size), Image.Resampling.LANCZOS)
        frames.append(np.asarray(crop, dtype=np.uint8))
    return frames


def synth_frames(size: int, count: int) -> list[np.ndarray]:
    frames: list[np.ndarray] = []
    index = 0
    while len(frames) < count:
        frames += make_episode(0, index, size, wrist=False).frames["rgb_static"]
        index += 1
    return frames[:count]


def jpeg_420(img: np.ndarray, quality: int = 95) -> bytes:
    """PIL's default JPEG (4:2:0), as a camera driver or TFDS' encode_jpeg writes it."""
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def reencoded(img: np.ndarray) -> tuple[bytes, np.ndarray]:
    source = decode_image(jpeg_420(img))
    return jpeg_420(source), source


# name -> frame -> (stored bytes, the pixels a lossless store would have given the reader)
VARIANTS: dict[str, Callable[[np.ndarray], tuple[bytes, np.ndarray]]] = {
    "png (auto, pixels)": lambda img: (encode_image(img, "png"), img),
    "jpg 4:4:4 q95 (jpg, pixels)": lambda img: (encode_image(img, "jpg", 95), img),
    "jpg copied (auto/jpg, JPEG source)": lambda img: (jpeg_420(img), decode_image(jpeg_420(img))),
    "before: jpg 4:2:0 q95, pixels": lambda img: (jpeg_420(img), img),
    "before: JPEG source re-encoded 4:2:0 q95": reencoded,
}


def measure(frames: list[np.ndarray], rounds: int) -> dict[str, dict[str, float]]:
    pairs = {name: [fn(img) for img in frames] for name, fn in VARIANTS.items()}
    encoded = {name: [blob for blob, _ in items] for name, items in pairs.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(rounds):
        for name, blobs in encoded.items():
            start = time.perf_counter()
            for blob in blobs:
                decode_image(blob)
            times[name].append((time.perf_counter() - start) / len(blobs))
    out = {}
    for name, blobs in encoded.items():
        diffs = [np.abs(decode_image(b).astype(int) - ref.astype(int)).mean() for b, ref in pairs[name]]
        err = float(np.mean(diffs))
        raw = frames[0].nbytes
        size = statistics.mean(len(b) for b in blobs)
        out[name] = {"kb": size / 1024, "ratio": raw / size, "us": statistics.median(times[name]) * 1e6, "err": err}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--frames", type=int, default=200, help="frames per set (224 px sets use half)")
    args = parser.parse_args()
    print(f"$ {command_line()}\n")
    print("| set | variant | KiB/frame | raw/stored | decode µs/frame | mean abs error (0-255) |")
    print("|---|---|---|---|---|---|")
    for size in (64, 224):
        count = args.frames if size == 64 else args.frames // 2
        for set_name, make in (("photo", photo_frames), ("synth", synth_frames)):
            for name, row in measure(make(size, count), args.rounds).items():
                cells = [f"{set_name} {size} px", name, f"{row['kb']:.1f}", f"{row['ratio']:.1f}x"]
                cells += [f"{row['us']:.0f}", f"{row['err']:.2f}"]
                print(f"| {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
