"""Which VLM families exist and where their adapters live: one explicit table, imported lazily.

The table maps a family name (`model.backbone.family`) to the import path of its adapter class.
Listing and validating names reads only this table, so config checks and the launcher's prepare
step answer in milliseconds without importing torch or transformers; the adapter module itself is
imported the first time `get_backbone_class` asks for it. Adding a family is one line here plus
its adapter module (and its tiny builder in `tiny_families.py`).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the contract imports torch; only type checkers need it here
    from vla_scale.model.backbones.contract import BackboneAdapter

BACKBONES: dict[str, str] = {
    "idefics3": "vla_scale.model.backbones.idefics3:Idefics3Adapter",
    "kosmos2": "vla_scale.model.backbones.kosmos2:Kosmos2Adapter",
    "llava": "vla_scale.model.backbones.llava:LlavaAdapter",
    "paligemma": "vla_scale.model.backbones.paligemma:PaliGemmaAdapter",
    "paligemma2": "vla_scale.model.backbones.paligemma:PaliGemma2Adapter",
    "qwen2_5_vl": "vla_scale.model.backbones.qwen2_vl:Qwen25VLAdapter",
    "qwen2_vl": "vla_scale.model.backbones.qwen2_vl:Qwen2VLAdapter",
    "smolvlm": "vla_scale.model.backbones.idefics3:SmolVLMAdapter",
}

# Adapters registered at run time by code outside this package (`register_backbone`); empty by default.
_EXTRA: dict[str, type[BackboneAdapter]] = {}


class UnknownBackboneError(KeyError):
    """A family name not in the registry (a KeyError whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def available_backbones() -> list[str]:
    """Every family name `model.backbone.family` accepts, sorted."""
    return sorted({*BACKBONES, *_EXTRA})


def check_backbone_family(name: str) -> str:
    """Return `name` if it is a known family; otherwise raise an error that suggests the closest ones.

    Imports nothing: safe for config validation and the launcher's prepare step.
    """
    if name in BACKBONES or name in _EXTRA:
        return name
    known = available_backbones()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise UnknownBackboneError(
        f"unknown backbone family {name!r} (model.backbone.family).{hint} Registered: {', '.join(known)}"
    )


def get_backbone_class(name: str) -> type[BackboneAdapter]:
    """The adapter class of a family, importing its module on first use (this is where transformers loads)."""
    check_backbone_family(name)
    if name in _EXTRA:
        return _EXTRA[name]
    module_name, _, class_name = BACKBONES[name].partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def register_backbone(name: str) -> Callable[[type[BackboneAdapter]], type[BackboneAdapter]]:
    """Class decorator for adapters defined outside this package (the built-in ones are in `BACKBONES`).

    A name already taken, by the table or an earlier registration, is refused unless it is the same class.
    """

    def decorator(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
        path = f"{cls.__module__}:{cls.__qualname__}"
        taken = {**BACKBONES, **{n: f"{c.__module__}:{c.__qualname__}" for n, c in _EXTRA.items()}}
        if name in taken:
            if taken[name] != path:
                raise ValueError(f"backbone family {name!r} is already registered by {taken[name]}")
            return cls
        cls.family = name
        _EXTRA[name] = cls
        return cls

    return decorator
