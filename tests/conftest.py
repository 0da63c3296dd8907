"""Fixtures shared by every test folder; helpers that start training jobs live in tests/train/jobs.py."""

import os
from pathlib import Path

import pytest
import torch

from data_tools.synth import synth
from tests.built_once import built_once

# Under pytest-xdist every worker is one test process per core share: without this each worker's torch would
# start a thread per core, and two workers' spinning OpenMP threads on 2 cores slowed the model tests ~5x.
# Subprocesses inherit the variable (rank processes set their own per rank, as the launchers do).
if os.environ.get("PYTEST_XDIST_WORKER"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic robot + VL dataset the 2-rank jobs train on (read-only: built once per session)."""

    def build(out: Path) -> None:
        synth(out, episodes=24, vl_samples=16, image_size=32, seed=0, episodes_per_shard=5)

    return built_once(tmp_path_factory, "synth", build)


# ----- running on pytest-xdist workers (`make test` runs `-n 2 --dist loadscope --no-loadscope-reorder`) -----

# Each test module runs whole on one worker (`loadscope`), so its module-scoped fixtures are built once and a test
# that briefly moves a fixture's file away cannot race a neighbour. (xdist's `loadgroup` could split modules
# finer, but with pytest 9.2 it groups nothing: xdist 3.8 renames `item._nodeid`, which pytest 9 no longer reads.)
# The longest tests and modules (measured on 2 cores), longest first: their modules are handed out first so that
# no worker is left running a long one alone at the end. The two modules that start with a test needing the
# shared reference run are not both first, so one worker does not wait for the other to build it.
LONGEST_FIRST = (  # by CPU time per module, measured on the whole suite (largest first)
    "tests/train/test_launcher_integration.py",
    "tests/train/test_engine_integration.py::test_zero3_with_optimizer_and_parameter_offload",  # no reference run
    "tests/train/test_engine_integration.py",
    "tests/train/test_multinode.py",
    "tests/train/test_elastic_resume.py",
    "tests/train/test_preempt.py",
    "tests/eval/test_runner.py",
    "tests/train/test_remote_train.py",
    "tests/train/test_eval_hook.py",
    "tests/train/test_converted_formats_train.py",
    "tests/train/test_heads_zero.py",
    "tests/train/test_families_launch.py",
    "tests/data_tools/test_collect.py",
    "tests/train/test_export_policy.py",
    "tests/serve/",
    "tests/train/",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Hand out the longest tests' modules first (a module's place is that of its first test)."""

    def rank(item: pytest.Item) -> int:
        return next((i for i, prefix in enumerate(LONGEST_FIRST) if item.nodeid.startswith(prefix)), len(LONGEST_FIRST))

    items.sort(key=rank)  # stable: collection order within a rank
