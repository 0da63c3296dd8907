"""The printed tables of `vla-scale eval` / `eval-report`, from summarised episodes."""

from __future__ import annotations

from vla_scale.eval.metrics import summarize_episodes
from vla_scale.eval.report import format_comparison, format_results


def results(episodes: list[dict]) -> dict:
    return {"suite": "instruct", "config": {"label": "run"}, **summarize_episodes(episodes, ["a", "b"])}


def test_per_task_table_and_how_the_chunks_joined():
    eps = [
        {"task": "a", "success": True, "length": 9, "chunk_switches": 2, "steps_within_chunks": 6,
         "planned_switches": 2, "switch_jump": 0.5, "step_jump": 0.25, "switch_departure": 0.125,
         "stalled_steps": 1, "stale_rows_skipped": 4},
        {"task": "b", "success": False, "length": 5, "chunk_switches": 4, "steps_within_chunks": 0,
         "planned_switches": 0, "switch_jump": 0.5, "step_jump": None, "switch_departure": None,
         "stalled_steps": 1, "stale_rows_skipped": 8},
    ]  # fmt: skip
    text = format_results(results(eps))
    assert "a" in text and "100.0%" in text and "overall" in text and "50.0%" in text
    assert "0.5000 at the 6 chunk switches, 0.2500 between steps of one chunk" in text
    assert "departs 0.1250 from the replaced chunk's plan; 2 stalled steps, 12 stale rows skipped" in text


def test_no_chunk_line_for_agents_without_chunks_and_no_nan_when_every_step_switches():
    plain = [{"task": "a", "success": True, "length": 3}, {"task": "b", "success": True, "length": 4}]
    assert "chunk" not in format_results(results(plain))
    every_step = [
        {"task": "a", "success": True, "length": 3, "chunk_switches": 2, "steps_within_chunks": 0,
         "planned_switches": 2, "switch_jump": 0.5, "step_jump": None, "switch_departure": 0.25},
    ]  # fmt: skip
    line = format_results(results(every_step)).splitlines()[-1]
    assert "0.5000 at the 2 chunk switches; a new chunk departs 0.2500" in line and "nan" not in line
    assert "run" in format_comparison([{**results(every_step), "_path": "x/results.json"}])
