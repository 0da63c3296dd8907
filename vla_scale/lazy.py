"""Lazy package exports (PEP 562), shared by the packages whose names live in heavy submodules.

Why: `vla_scale.model` and `vla_scale.model.backbones` re-export names whose modules import torch and
transformers; importing the package (or a light submodule such as `backbones.registry`) must not.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`(__getattr__, __dir__)` for `package`, whose name `n` is defined in submodule `exports[n]`.

    The first access imports that submodule and caches the value in the package namespace, so later
    accesses are plain attribute lookups; unknown names raise AttributeError as for any module.
    """
    namespace = vars(sys.modules[package])

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
