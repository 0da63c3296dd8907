"""Wilson intervals against published values, and the per-task summary."""

import math

import pytest

from vla_scale.eval.metrics import rate, summarize_episodes, wilson_interval


@pytest.mark.parametrize(
    ("k", "n", "lo", "hi"),
    [
        # Closed-form values (p + z^2/2n +- z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n), z = 1.96, worked by hand.
        (0, 10, 0.0, 0.277532),
        (10, 10, 0.722468, 1.0),
        (5, 10, 0.236593, 0.763407),
        (1, 20, 0.008881, 0.236131),
        (81, 263, 0.255289, 0.366210),
    ],
)
def test_wilson_interval_matches_reference_values(k, n, lo, hi):
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(lo, abs=1e-5) and got[1] == pytest.approx(hi, abs=1e-5)


def test_wilson_interval_contains_the_rate_and_narrows_with_n():
    small, large = wilson_interval(3, 10), wilson_interval(300, 1000)
    assert small[0] < 0.3 < small[1] and large[0] < 0.3 < large[1]
    assert large[1] - large[0] < small[1] - small[0]
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(4, 3)


def test_summary_per_task_and_overall():
    eps = [
        {"task": "a", "success": True, "length": 10},
        {"task": "a", "success": False, "length": 30},
        {"task": "b", "success": True, "length": 5},
    ]
    out = summarize_episodes(eps, ["a", "b"])
    assert out["tasks"]["a"]["success"]["rate"] == 0.5 and out["tasks"]["a"]["mean_length"] == 20
    assert out["tasks"]["b"]["success"] == rate([True])
    assert out["overall"]["success"]["successes"] == 2 and out["overall"]["episodes"] == 3
    assert math.isclose(out["overall"]["mean_length"], 15)
    swapped = summarize_episodes([{**e, "followed": e["success"], "original": False} for e in eps], ["a", "b"], True)
    assert swapped["overall"]["followed"]["rate"] == pytest.approx(2 / 3)
    assert swapped["overall"]["original"]["rate"] == 0


def test_chunk_figures_pool_every_step_of_the_episodes():
    eps = [
        {"task": "a", "success": True, "length": 9, "chunk_switches": 2, "steps_within_chunks": 6,
         "planned_switches": 2, "switch_jump": 1.0, "step_jump": 0.5, "switch_departure": 0.2,
         "stalled_steps": 1, "stale_rows_skipped": 4},
        {"task": "a", "success": False, "length": 5, "chunk_switches": 1, "steps_within_chunks": 3,
         "planned_switches": 0, "switch_jump": 4.0, "step_jump": 0.5, "switch_departure": None,
         "stalled_steps": 1, "stale_rows_skipped": 2},
    ]  # fmt: skip
    o = summarize_episodes(eps, ["a"])["overall"]
    assert o["switch_jump"] == pytest.approx((2 * 1.0 + 4.0) / 3)  # per switch, not per episode
    assert o["step_jump"] == pytest.approx(0.5) and o["switch_departure"] == pytest.approx(0.2)
    assert (o["chunk_switches"], o["planned_switches"], o["stalled_steps"], o["stale_rows_skipped"]) == (3, 2, 2, 6)
    assert "switch_jump" not in summarize_episodes([{"task": "a", "success": True, "length": 3}], ["a"])["overall"]
