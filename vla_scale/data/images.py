"""Image members of the dataset format: which encodings exist, encoding a camera's frames, decoding one.

Lossless where the source is: files that already are JPEG/PNG/WebP are copied byte for byte, pixels
are stored as PNG unless JPEG (4:4:4) or WebP is asked for (`data_tools --image-ext`).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from vla_scale.data.errors import FormatError

IMAGE_EXTS = ("jpg", "png", "webp")
# What writers accept: a member format, or "auto" = copy source bytes that are JPEG/PNG/WebP, PNG for pixels.
IMAGE_ENCODINGS = ("auto", *IMAGE_EXTS)
JPEG_QUALITY = 95
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))
_PIL_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def encode_image(img: np.ndarray, ext: str = "jpg", quality: int = JPEG_QUALITY) -> bytes:
    """Pixels → file bytes; JPEG without chroma subsampling (4:4:4: 4:2:0 costs ~10x the error on detail)."""
    if ext not in IMAGE_EXTS:
        raise FormatError(f"image extension {ext!r} not in {IMAGE_EXTS}")
    buf = io.BytesIO()
    pil = Image.fromarray(np.asarray(img, dtype=np.uint8))
    if ext == "jpg":
        pil.save(buf, format="JPEG", quality=quality, subsampling=0)
    elif ext == "png":
        pil.save(buf, format="PNG")
    else:
        pil.save(buf, format="WEBP", quality=quality)
    return buf.getvalue()


def image_format(data: bytes) -> str | None:
    """ "jpg" / "png" / "webp" from a file's magic bytes, None for anything else."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), None)


def encode_camera(
    frames: list[np.ndarray | bytes], image_ext: str = "auto", quality: int = JPEG_QUALITY
) -> tuple[str, str, list[bytes]]:
    """One camera's frames → (member extension, encoding description, file bytes per frame).

    Source bytes are copied unchanged (after a decode that proves them readable) when every frame is a
    file of the chosen format, or of any readable format under "auto"; re-encoding a JPEG only adds error.
    Otherwise pixels are encoded: "auto" → PNG (lossless), "jpg" → 4:4:4 at `quality`.
    """
    if image_ext not in IMAGE_ENCODINGS:
        raise FormatError(f"image encoding {image_ext!r} not in {IMAGE_ENCODINGS}")
    formats = {image_format(f) if isinstance(f, bytes | bytearray) else None for f in frames}
    source = formats.pop() if len(formats) == 1 else None
    if source is not None and image_ext in ("auto", source):
        for f in frames:
            decode_image(f)
        return source, "png" if source == "png" else f"{source} (source bytes)", [bytes(f) for f in frames]
    ext = "png" if image_ext == "auto" else image_ext
    pixels = (decode_image(f) if isinstance(f, bytes | bytearray) else f for f in frames)
    data = [encode_image(p, ext, quality) for p in pixels]
    return ext, {"png": "png", "jpg": f"jpg q{quality} 4:4:4", "webp": f"webp q{quality}"}[ext], data


def decode_image(data: bytes) -> np.ndarray:
    """Compressed bytes → uint8 `[H, W, 3]`; raises FormatError when undecodable."""
    fmt = image_format(data)  # naming the format spares PIL probing every plugin; None: let PIL try them all
    try:
        with Image.open(io.BytesIO(data), formats=None if fmt is None else [_PIL_FORMATS[fmt]]) as pil:
            return np.asarray(pil if pil.mode == "RGB" else pil.convert("RGB"), dtype=np.uint8)
    except Exception as err:  # PIL raises several types for corrupt data
        raise FormatError(f"undecodable image ({err})") from err
