"""Fixtures shared by every test folder; helpers that start training jobs live in tests/train/jobs.py."""

from pathlib import Path

import pytest

from data_tools.synth import synth


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic robot + VL dataset the 2-rank jobs train on (read-only: built once per session)."""
    out = tmp_path_factory.mktemp("synth")
    synth(out, episodes=24, vl_samples=16, image_size=32, seed=0, episodes_per_shard=5)
    return out
