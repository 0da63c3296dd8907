"""Session fixtures built once for all pytest-xdist workers (`make test` runs the suite in two processes)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str, build: Callable[[Path], object]) -> Path:
    """A folder `build` fills once per test session, shared by every xdist worker (the first to ask builds it
    under a file lock while the others wait). Users must treat it as read-only."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    root = tmp_path_factory.getbasetemp().parent  # the session's folder, above each worker's own
    out, done = root / name, root / f"{name}.built"
    with FileLock(str(root / f"{name}.lock"), timeout=1800):
        if not done.is_file():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            build(out)
            done.touch()
    return out
