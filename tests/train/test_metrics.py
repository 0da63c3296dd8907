"""Metric meters and sinks (single process; the 2-rank reduction runs in the launcher integration test)."""

import os
import time

import pytest
import torch

from vla_scale.config.schema import WandbConfig
from vla_scale.train.log_window import LogWindow
from vla_scale.train.metrics import Meters, MetricsWriter, read_metrics, wandb_mode


def test_meters_average_each_key_over_its_own_count_and_reset():
    m = Meters()
    m.add({"loss": torch.tensor(1.0), "loss_arm": torch.tensor(3.0)})
    m.add({"loss": torch.tensor(2.0), "loss_vl": 5.0})
    assert m.reduce() == {"loss": 1.5, "loss_arm": 3.0, "loss_vl": 5.0}
    assert m.reduce() == {}


def test_log_window_means_and_throughput_then_starts_afresh():
    window = LogWindow(world_size=1)
    start = time.perf_counter()
    time.sleep(0.02)  # "waiting for data", inside the window's wall time
    window.add_fetch(time.perf_counter() - start)
    for loss in (1.0, 3.0):
        window.add_micro_step(batch_size=2, num_tokens=torch.tensor(10))
        window.add({"loss": torch.tensor(loss)})
    means, rates = window.close()
    assert means == {"loss": 2.0}
    assert rates["samples_per_s"] > 0 and rates["tokens_per_s"] == pytest.approx(5 * rates["samples_per_s"])
    assert 0 < rates["data_wait_frac"] <= 1
    means, rates = window.close()  # an empty window: nothing carried over
    assert means == {} and rates["samples_per_s"] == 0 and rates["data_wait_frac"] == 0


def test_wandb_defaults_offline_without_key(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode(WandbConfig(mode="auto")) == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode(WandbConfig(mode="auto")) == "online"
    assert wandb_mode(WandbConfig(mode="disabled")) == "disabled"


def test_writer_appends_jsonl_and_drops_steps_past_the_resumed_checkpoint(tmp_path):
    off = WandbConfig(mode="disabled")
    w = MetricsWriter(tmp_path, "r", off, {}, start_step=0)
    for step in range(1, 6):
        w.write(step, {"loss": float(step)})
    w.close()
    # The run died after logging step 5; its latest checkpoint is step 3.
    w = MetricsWriter(tmp_path, "r", off, {}, start_step=3)
    w.write(4, {"loss": 40.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


@pytest.fixture
def restored_environ():
    """`wandb.init` leaves WANDB_SERVICE (its service's socket) in os.environ; the jobs this worker starts later
    would hand it to their ranks (which then attach to this process's wandb service) and, differing in their
    environment, need rank servers of their own (tests/train/rank_server.py)."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def test_offline_wandb_run_keeps_its_id_across_resume(restored_environ, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    w = MetricsWriter(tmp_path, "r", WandbConfig(), {"a": 1}, start_step=0)
    w.write(1, {"loss": 1.0})
    run_id = w.wandb.id
    w.close()
    w = MetricsWriter(tmp_path, "r", WandbConfig(), {"a": 1}, start_step=1)
    assert w.wandb.id == run_id
    w.close()
    assert list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
