"""Toy source dataset for the converter tests and the converted-formats training test.

An RLDS / TFDS folder: features.json, dataset_info.json, train and val TFRecord files.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

from tests.data_tools.tfrecord_encoder import example, feature, write_tfrecord

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
