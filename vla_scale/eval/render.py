"""Headless MuJoCo rendering tuned for software (CPU) OpenGL.

On a software renderer MuJoCo's default 4096-px shadow map dominates the frame time: turning
shadows and multisampling off (`vis.quality.shadowsize = offsamples = 0`) before the first
render was ~10x faster here. `MUJOCO_GL` defaults to `egl`, which works without a display;
when the OpenGL library is missing the error names it and the package that provides it,
instead of PyOpenGL's "'NoneType' object has no attribute 'glGetError'".
"""

from __future__ import annotations

import ctypes.util
import os
import weakref
from collections.abc import Iterable
from typing import Any

import numpy as np

# backend -> (library that must load, how to get it on Debian/Ubuntu)
_GL_LIBRARIES = {
    "egl": ("EGL", "libEGL (apt-get install libegl1 libgl1)"),
    "osmesa": ("OSMesa", "libOSMesa (apt-get install libosmesa6)"),
    "glfw": ("glfw", "libglfw + libGL and a display (apt-get install libglfw3 libgl1), or set MUJOCO_GL=egl"),
}


class RenderError(RuntimeError):
    """Rendering could not start; the message names the missing system library."""


def gl_backend() -> str:
    """The OpenGL backend MuJoCo will use (sets the `egl` default when MUJOCO_GL is unset)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    backend = os.environ["MUJOCO_GL"].lower().strip()
    return "glfw" if backend in ("", "glfw", "1", "on", "true", "enable", "enabled") else backend


def _explain(err: BaseException) -> RenderError:
    backend = gl_backend()
    lib, hint = _GL_LIBRARIES.get(backend, (None, f"a working OpenGL for MUJOCO_GL={backend}"))
    found = lib is not None and ctypes.util.find_library(lib) is not None
    status = "was found but failed to start" if found else "was not found"
    return RenderError(
        f"MuJoCo offscreen rendering failed with MUJOCO_GL={backend}: the system library {hint} {status}. "
        f"Set MUJOCO_GL=egl (headless, default) or MUJOCO_GL=osmesa and install the library it needs. "
        f"Original error: {type(err).__name__}: {err}"
    )


def import_mujoco() -> Any:
    """Import mujoco with the headless default; a missing GL library raises `RenderError`."""
    gl_backend()
    try:
        import mujoco
    except Exception as err:  # PyOpenGL raises AttributeError/ImportError when the library is absent
        raise _explain(err) from err
    return mujoco


def set_fast_render(model: Any, size: int) -> None:
    """Shadows and multisampling off; offscreen buffer at least `size` px."""
    model.vis.quality.shadowsize = 0
    model.vis.quality.offsamples = 0
    model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), size)
    model.vis.global_.offheight = max(int(model.vis.global_.offheight), size)


def require_camera(model: Any, name: str) -> None:
    """Raise a ValueError naming the model's cameras when `name` is not one of them."""
    names = [model.camera(i).name for i in range(model.ncam)]
    if name not in names:
        raise ValueError(f"no camera {name!r} in this scene; cameras: {', '.join(names)}")


class Renderer:
    """Square RGB frames from named cameras; cameras in `flipped` are rotated 180 degrees upright."""

    def __init__(self, model: Any, size: int, flipped: Iterable[str] = ()) -> None:
        mujoco = import_mujoco()
        set_fast_render(model, size)
        self.size = size
        self.flipped = frozenset(flipped)
        try:
            self._renderer = mujoco.Renderer(model, size, size)
        except Exception as err:
            raise _explain(err) from err
        # free the GL context before interpreter teardown even when close() is forgotten
        self._finalizer = weakref.finalize(self, self._renderer.close)

    def render(self, data: Any, camera: str) -> np.ndarray:
        """uint8 [size, size, 3] frame of `camera`, upright."""
        try:
            self._renderer.update_scene(data, camera=camera)
            img = self._renderer.render()
        except Exception as err:
            raise _explain(err) from err
        if camera in self.flipped:
            img = img[::-1, ::-1]
        return np.ascontiguousarray(img, dtype=np.uint8)

    def close(self) -> None:
        """Free the GL context (before interpreter exit, or EGL prints an error)."""
        finalizer = getattr(self, "_finalizer", None)
        if finalizer is not None:
            finalizer()
