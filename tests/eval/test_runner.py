"""Closed-loop evaluation: the chunk executor, the runner on the instruct suite, swapped instructions, videos."""

from __future__ import annotations

import numpy as np
import pytest

from vla_scale.eval.agents import ChunkExecutor


def chunk(start: int, n: int = 4) -> np.ndarray:
    """A chunk whose row i holds the step it was meant for (start + i) in both dims."""
    steps = np.arange(start, start + n, dtype=np.float32)
    return np.stack([steps, 10 * steps], axis=1)


def test_executor_runs_exec_steps_open_loop_then_replans():
    ex = ChunkExecutor(exec_steps=3)
    queried, actions = [], []
    for t in range(7):
        if ex.due():
            queried.append(t)
            ex.push(chunk(t) + 100 * len(queried))  # each chunk distinguishable
        actions.append(ex.pop())
    assert queried == [0, 3, 6]
    # steps 0-2 from chunk 1 (rows 0-2), 3-5 from chunk 2, 6 from chunk 3: each row is the one meant for its step
    assert [a[0] for a in actions] == [100, 101, 102, 203, 204, 205, 306]
    ex.reset()
    assert ex.due() and ex.t == 0


def test_executor_rejects_exec_steps_beyond_the_chunk():
    ex = ChunkExecutor(exec_steps=5)
    with pytest.raises(ValueError, match="chunk length 4"):
        ex.push(chunk(0))


def test_temporal_ensemble_averages_overlapping_chunks_with_exponential_weights():
    k = 0.5
    ex = ChunkExecutor(exec_steps=1, ensemble=True, ensemble_k=k)
    preds = {}  # step predicted at -> chunk
    rng = np.random.default_rng(0)
    for t in range(6):
        assert ex.due()
        preds[t] = rng.normal(size=(3, 2)).astype(np.float32)
        ex.push(preds[t])
        got = ex.pop()
        # chunks predicted at s in [t-2, t] cover step t; the oldest gets weight exp(0), the next exp(-k), ...
        covering = [s for s in sorted(preds) if s <= t < s + 3]
        w = np.exp(-k * np.arange(len(covering)))
        want = sum(wi * preds[s][t - s] for wi, s in zip(w, covering, strict=True)) / w.sum()
        np.testing.assert_allclose(got, want, rtol=1e-6)
    assert len(covering) == 3


def test_ensemble_with_exec_steps_replans_every_k_and_blends_the_overlap():
    ex = ChunkExecutor(exec_steps=2, ensemble=True, ensemble_k=0.0)  # k = 0: plain mean of the overlap
    ex.push(np.zeros((4, 1)))
    assert ex.pop()[0] == 0 and not ex.due()
    assert ex.pop()[0] == 0 and ex.due()
    ex.push(np.ones((4, 1)))
    assert ex.pop()[0] == pytest.approx(0.5)  # steps 2-3 covered by both chunks
    assert ex.pop()[0] == pytest.approx(0.5) and ex.due()
    ex.push(np.full((4, 1), 3.0))
    assert ex.pop()[0] == pytest.approx(2.0)  # the first chunk no longer covers step 4
