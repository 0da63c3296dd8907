"""Rollout videos a person can open: H.264 mp4 through PyAV, or an animated GIF through Pillow.

Simulator frames are small (64 px), so they are scaled up by an integer factor with
nearest-neighbour sampling (crisp pixels, even sizes as H.264's yuv420p needs); the wrist
camera, when there is one, is shown to the right of the static camera.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

MIN_SIDE = 256  # frames are upscaled until their height reaches this


def compose_frame(image: np.ndarray, wrist: np.ndarray | None = None) -> np.ndarray:
    """One video frame: the static view, with the wrist view (resized to its height) to its right."""
    if wrist is None:
        return image
    (h, w), height = wrist.shape[:2], image.shape[0]
    if h != height:  # nearest-neighbour resize to the static view's height, keeping the aspect ratio
        width = max(1, round(w * height / h))
        wrist = wrist[np.arange(height) * h // height][:, np.arange(width) * w // width]
    return np.concatenate([image, wrist], axis=1)


def _upscale(frame: np.ndarray) -> np.ndarray:
    factor = max(1, -(-MIN_SIDE // frame.shape[0]))
    frame = frame.repeat(factor, axis=0).repeat(factor, axis=1)
    h, w = frame.shape[:2]
    return frame[: h - h % 2, : w - w % 2]


def write_video(frames: Sequence[np.ndarray], path: str | Path, fps: int = 10) -> Path:
    """Write uint8 [H, W, 3] frames to `path` (.mp4 or .gif); returns the path written."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scaled = [_upscale(np.ascontiguousarray(f, dtype=np.uint8)) for f in frames]
    if path.suffix == ".gif":
        return _write_gif(scaled, path, fps)
    if path.suffix != ".mp4":
        raise ValueError(f"video path {path} must end in .mp4 or .gif")
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = scaled[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.thread_count = 1  # eval workers already use every core
        for frame in scaled:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _write_gif(frames: list[np.ndarray], path: Path, fps: int) -> Path:
    from PIL import Image

    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=int(1000 / fps), loop=0)
    return path
