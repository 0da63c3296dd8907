"""Toy source dataset for the converter tests and the converted-formats training test.

A LLaVA-style conversation JSON with PNG/JPEG/RGBA/grayscale, missing, corrupt and text-only entries.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image


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
