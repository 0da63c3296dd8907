"""Shared fixtures: one tiny LLaVA checkpoint per session, written and loaded the way real ones are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones import build_tiny_backbone
from vla_scale.model.backbones.llava import LlavaAdapter

TINY = TinyBackboneConfig()  # hidden 64, 2 LM layers, SigLIP 64x64 images in 16x16 patches -> 16 image tokens


@pytest.fixture(scope="session")
def tiny_built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlavaAdapter]:
    """The tiny checkpoint folder and the in-memory adapter build_tiny_backbone returned."""
    path = tmp_path_factory.mktemp("tiny_llava")
    adapter = build_tiny_backbone("llava", TINY, path, seed=0)
    return path, adapter


@pytest.fixture(scope="session")
def tiny_path(tiny_built: tuple[Path, LlavaAdapter]) -> Path:
    return tiny_built[0]


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(0)
