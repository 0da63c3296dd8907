"""`universal.convert` without a collective around the conversion: the other ranks poll for its result, so a
conversion longer than the process-group timeout does not fail them, and rank 0's failure reaches them."""

import threading
import time

import pytest

from vla_scale.train import universal


def test_other_ranks_wait_for_the_folder_and_stop_on_rank0s_failure(tmp_path):
    ckpts = tmp_path / "checkpoints"
    (ckpts / "step_00000002").mkdir(parents=True)  # not a DeepSpeed checkpoint: ds_to_universal fails on it
    with pytest.raises(RuntimeError, match="ds_to_universal failed"):
        universal.convert(ckpts, "step_00000002", rank=0)
    assert "ds_to_universal failed" in (ckpts / "universal" / ".step_00000002.failed").read_text()
    with pytest.raises(RuntimeError, match="rank 0 could not convert .*ds_to_universal failed"):
        universal.convert(ckpts, "step_00000002", rank=1, poll_s=0.01)

    target = ckpts / "universal" / "step_00000003"
    threading.Timer(0.3, target.mkdir).start()  # rank 0 renaming its finished conversion into place
    start = time.monotonic()
    assert universal.convert(ckpts, "step_00000003", rank=1, poll_s=0.01) == ckpts / "universal"
    assert target.is_dir() and time.monotonic() - start >= 0.25


def test_prune_keeps_only_the_conversion_being_loaded(tmp_path):
    ckpts = tmp_path / "checkpoints"
    out = ckpts / "universal"
    for name in ("step_00000002", "step_00000004", ".step_00000004.tmp", "step_00000006"):
        (out / name / "zero").mkdir(parents=True)
    (out / ".step_00000002.failed").write_text("boom\n")
    (out / ".step_00000006.failed").write_text("boom\n")
    # converting step 6: the older conversions and their leftovers go, step 6's own entries stay
    removed = universal.prune(ckpts, keep="step_00000006")
    assert removed == [".step_00000002.failed", ".step_00000004.tmp", "step_00000002", "step_00000004"]
    assert sorted(p.name for p in out.iterdir()) == [".step_00000006.failed", "step_00000006"]
    # a new checkpoint was saved: nothing is needed any more, the folder goes too
    assert universal.prune(ckpts) == [".step_00000006.failed", "step_00000006"]
    assert not out.exists() and ckpts.is_dir()
    assert universal.prune(ckpts) == []  # nothing to do
