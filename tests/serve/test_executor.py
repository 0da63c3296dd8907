"""Asynchronous chunk execution against a real server whose inference takes an artificial 0.1 s: the control loop
(12.5 Hz) stalls only on its first tick, and late chunks skip the rows for ticks that already passed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from tests.serve.conftest import CHUNK, make_obs
from vla_scale.serve import AsyncChunkExecutor, PolicyClient
from vla_scale.serve.server import load_server

DELAY_S = 0.1
PERIOD_S = 0.08  # control tick: an inference (> 0.1 s) spans at least 2 ticks
TICKS = 3 * CHUNK


@pytest.fixture(scope="module")
def slow_url(export_dir, one_thread):
    with load_server(export_dir, port=0, delay_s=DELAY_S) as srv:
        yield srv.url


def control_loop(
    url: str, overlap: int
) -> tuple[AsyncChunkExecutor, dict[int, np.ndarray], list[np.ndarray], list[float]]:
    """TICKS ticks at PERIOD_S; returns the executor, the chunk requested at each tick, the actions executed and
    when each tick began (a loaded machine may run a tick late)."""
    rng = np.random.default_rng(0)
    observations = [make_obs(rng) for _ in range(TICKS)]
    chunks: dict[int, np.ndarray] = {}
    with PolicyClient(url) as client:

        def request(obs: dict) -> np.ndarray:
            tick = obs.pop("tick")
            chunks[tick] = client.infer(obs)
            return chunks[tick]

        client.reset()
        executor = AsyncChunkExecutor(request, overlap=overlap)
        actions, began = [], []
        next_tick = time.perf_counter()
        for t in range(TICKS):
            began.append(time.perf_counter())
            actions.append(executor.act({**observations[t], "tick": t}))
            next_tick += PERIOD_S
            time.sleep(max(0.0, next_tick - time.perf_counter()))  # the robot's fixed control rate
        executor.close()
    return executor, chunks, actions, began


def test_sync_execution_stalls_once_per_chunk(slow_url):
    executor, chunks, actions, _ = control_loop(slow_url, overlap=0)
    stats = executor.stats
    assert sorted(chunks) == [0, CHUNK, 2 * CHUNK] and stats.stalled_ticks == 3 and stats.skipped_actions == 0
    assert stats.wait_s >= 3 * DELAY_S
    for t, (tick, start, row) in enumerate(stats.log):  # every chunk executed from its first row
        assert tick == t and start == t - t % CHUNK and row == t % CHUNK
        np.testing.assert_array_equal(actions[t], chunks[start][row])


def test_async_execution_keeps_the_loop_running_and_skips_stale_rows(slow_url):
    overlap = 6  # request at 6 actions left: 0.48 s of chunk for 0.1 s of inference (plus the tiny model's)
    executor, chunks, actions, began = control_loop(slow_url, overlap=overlap)
    stats = executor.stats
    assert stats.ticks == TICKS and stats.stalled_ticks == 1, stats  # only the episode's first tick waits
    assert stats.stalled_fraction == pytest.approx(1 / TICKS)
    starts = [start for _, start, _ in stats.log]
    assert len(set(starts)) >= 3 and starts == sorted(starts)  # newer chunks replace older ones
    skipped = 0
    for t, (tick, start, row) in enumerate(stats.log):
        assert tick == t and row == t - start  # a chunk requested at tick s gives tick t its row t - s
        np.testing.assert_array_equal(actions[t], chunks[start][row])
    for start in sorted(set(starts))[1:]:
        first_row = min(row for _, s, row in stats.log if s == start)
        # an inference takes > 0.1 s: no tick that began sooner after the request can have had that chunk (on
        # schedule that is the next tick, so at least 2 rows were stale; a late tick may find it ready)
        too_soon = sum(1 for t in range(start + 1, TICKS) if began[t] < began[start] + DELAY_S)
        assert first_row >= 1 + too_soon >= 1
        skipped += first_row
    assert stats.skipped_actions >= skipped
    assert stats.chunks == len(chunks) or stats.chunks == len(chunks) - 1  # the last request may still be running


def test_executor_request_errors_reach_the_control_loop(slow_url):
    with PolicyClient(slow_url) as client:
        executor = AsyncChunkExecutor(client.infer, overlap=2)
        with pytest.raises(Exception, match="obs.state"):
            executor.act({**make_obs(np.random.default_rng(0)), "state": np.zeros(2, np.float32)})
        executor.reset()
        assert executor.act(make_obs(np.random.default_rng(1))).shape == (4,)
        executor.close()
    with pytest.raises(ValueError, match="overlap"):
        AsyncChunkExecutor(client.infer, overlap=-1)


class Recorder:
    """A request function whose chunk k (row i = 100 k + i) is numbered by call order; it records each call."""

    def __init__(self, chunk: int = CHUNK) -> None:
        self.chunk, self.calls = chunk, []

    def __call__(self, obs: dict, prefix: np.ndarray | None = None, prefix_delay: int = 0) -> np.ndarray:
        self.calls.append((obs["tick"], None if prefix is None else prefix[:, 0].tolist(), prefix_delay))
        k = len(self.calls) - 1
        return (100 * k + np.arange(self.chunk, dtype=np.float32))[:, None].repeat(2, 1)


@pytest.mark.parametrize("delay", [1, 2, 3])
def test_simulated_delay_makes_each_chunk_available_delay_ticks_after_its_request(delay):
    overlap, ticks = 3, 3 * CHUNK
    req = Recorder()
    executor = AsyncChunkExecutor(req, overlap=overlap, delay_ticks=delay)
    executed = [float(executor.act({"tick": t})[0]) for t in range(ticks)]
    stats = executor.stats
    assert stats.stalled_ticks == 1 and stats.ticks == ticks  # the first tick only: every delay is covered
    requested = [tick for tick, _, _ in req.calls]
    assert requested[:3] == [0, CHUNK - overlap, 2 * (CHUNK - overlap)]  # a chunk is aligned to its request
    for t, (tick, start, row) in enumerate(stats.log):
        k = requested.index(start)
        assert tick == t and row == t - start and executed[t] == 100 * k + row
        if k:  # a later chunk is first executed exactly `delay` ticks after its request: rows before are stale
            assert min(r for _, s, r in stats.log if s == start) == delay
    assert stats.skipped_actions == delay * (stats.chunks - 1)


def test_simulated_delay_sends_the_rows_still_to_run_and_the_delay_with_real_time_chunking():
    req = Recorder()
    executor = AsyncChunkExecutor(req, overlap=4, inpaint=True, delay_ticks=2)
    for t in range(2 * CHUNK):
        executor.act({"tick": t})
    (_, first, _), (tick, prefix, delay), *_ = req.calls
    assert first is None and tick == CHUNK - 4 and delay == 2
    assert prefix == [float(r) for r in range(CHUNK - 4, CHUNK)]  # chunk 0's rows from the request's tick on


def test_simulated_delay_that_outlasts_a_short_chunk_stalls_without_advancing_the_clock():
    req = Recorder(chunk=4)
    executor = AsyncChunkExecutor(req, overlap=3, delay_ticks=3)  # adopted at row 3: 1 row left, delay 3
    for t in range(12):
        executor.act({"tick": t})
    assert executor.stats.stalled_ticks > 1 and executor.stats.ticks == 12
    assert [tick for tick, _, _ in executor.stats.log] == list(range(12))


def test_simulated_delay_is_checked():
    with pytest.raises(ValueError, match="overlap >= 3"):
        AsyncChunkExecutor(Recorder(), overlap=2, delay_ticks=3)
    with pytest.raises(ValueError, match="delay_ticks must be >= 1"):
        AsyncChunkExecutor(Recorder(), overlap=2, delay_ticks=0)
