"""The backbone registry: one explicit table, close-match errors, and listing names without importing transformers."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

import vla_scale.model.backbones as backbones
from vla_scale.model.backbones.registry import (
    BACKBONES,
    UnknownBackboneError,
    available_backbones,
    check_backbone_family,
    get_backbone_class,
)

FAMILIES = ["idefics3", "kosmos2", "llava", "paligemma", "paligemma2", "qwen2_5_vl", "qwen2_vl", "smolvlm"]


def run_python(code: str) -> str:
    """Run `code` in a fresh interpreter (so sys.modules starts empty) and return its stdout."""
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_table_lists_every_family_and_each_entry_resolves_to_its_adapter():
    from vla_scale.model.backbones.contract import BackboneAdapter
    from vla_scale.model.backbones.tiny_families import TINY_BUILDERS

    assert sorted(BACKBONES) == FAMILIES == available_backbones()
    assert sorted(TINY_BUILDERS) == FAMILIES  # every family can write a tiny checkpoint
    for name, path in BACKBONES.items():
        cls = get_backbone_class(name)
        assert issubclass(cls, BackboneAdapter) and f"{cls.__module__}:{cls.__qualname__}" == path
        assert cls.family == name
    assert get_backbone_class("smolvlm") is backbones.SmolVLMAdapter


TYPOS = [("qwen2vl", "qwen2_vl"), ("Llava", "llava"), ("paligema", "paligemma"), ("smolvm", "smolvlm")]


@pytest.mark.parametrize(("name", "suggestion"), TYPOS)
def test_unknown_family_error_names_the_close_match(name, suggestion):
    for lookup in (check_backbone_family, get_backbone_class):
        with pytest.raises(UnknownBackboneError) as info:
            lookup(name)
        message = str(info.value)
        assert f"unknown backbone family {name!r} (model.backbone.family)" in message
        assert f"Did you mean {suggestion!r}" in message.split("Registered:")[0]
        assert message.endswith("Registered: " + ", ".join(FAMILIES))
    assert isinstance(info.value, KeyError)  # callers that catch KeyError keep working
    assert check_backbone_family("kosmos2") == "kosmos2"


def test_a_name_close_to_nothing_gets_no_suggestion():
    with pytest.raises(KeyError) as info:
        check_backbone_family("zzz-no-such-vlm")
    assert "Did you mean" not in str(info.value) and "Registered: " in str(info.value)


def test_listing_and_checking_names_imports_neither_torch_nor_transformers():
    out = run_python(
        """
        import sys
        from vla_scale.model.backbones.registry import available_backbones, check_backbone_family
        import vla_scale.model.backbones
        names = available_backbones()
        check_backbone_family("llava")
        heavy = sorted(m for m in ("torch", "transformers", "numpy") if m in sys.modules)
        print(len(names), heavy)
        """
    )
    assert out.split() == ["8", "[]"]


def test_package_exports_resolve_lazily_to_the_defining_modules():
    for name in backbones.__all__:
        assert getattr(backbones, name) is not None, name
    assert backbones.get_backbone_class is get_backbone_class
    with pytest.raises(AttributeError, match="no_such_name"):
        backbones.no_such_name  # noqa: B018


def test_register_backbone_adds_an_outside_family_and_refuses_taken_names():
    out = run_python(
        """
        from vla_scale.model.backbones import LlavaAdapter, get_backbone_class, register_backbone
        from vla_scale.model.backbones.registry import available_backbones

        @register_backbone("my_llava")
        class MyLlava(LlavaAdapter):
            pass

        assert register_backbone("my_llava")(MyLlava) is MyLlava  # the same class again: a no-op
        assert get_backbone_class("my_llava") is MyLlava and MyLlava.family == "my_llava"
        assert "my_llava" in available_backbones()
        for taken in ("llava", "my_llava"):
            try:
                register_backbone(taken)(type("Other", (LlavaAdapter,), {}))
            except ValueError as err:
                print("refused:", err)
        """
    )
    lines = out.splitlines()
    assert len(lines) == 2
    assert "'llava' is already registered by vla_scale.model.backbones.llava:LlavaAdapter" in lines[0]
    assert "'my_llava' is already registered by __main__:MyLlava" in lines[1]
