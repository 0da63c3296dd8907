"""Closed-loop evaluation: the chunk executor, the runner on the instruct suite, swapped instructions, videos."""

from __future__ import annotations

import json
import multiprocessing
import time
from functools import partial
from pathlib import Path

import av
import numpy as np
import pytest

from data_tools.__main__ import main as data_tools_main
from vla_scale.eval.agents import ChunkExecutor, ExpertAgent, make_agent
from vla_scale.eval.instruct import task_names
from vla_scale.eval.metrics import wilson_interval
from vla_scale.eval.runner import EvalConfig, EvalError, evaluate, plan_jobs
from vla_scale.eval.seeds import is_eval_seed


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


# ----- the runner on the instruct suite -------------------------------------------------------------

TASKS = ["touch_red", "touch_blue", "push_green"]


def comparable(results: dict) -> dict:
    """What must not depend on the worker count: every figure and episode record, minus timing and paths."""
    episodes = [{k: v for k, v in e.items() if k != "video"} for e in results["episodes"]]
    return {"tasks": results["tasks"], "overall": results["overall"], "episodes": episodes}


@pytest.fixture(scope="module")
def expert_runs(tmp_path_factory) -> dict[int, dict]:
    out = {}
    for workers in (1, 2):
        folder = tmp_path_factory.mktemp(f"expert_w{workers}")
        cfg = EvalConfig(suite="instruct", tasks=TASKS, episodes=2, workers=workers, videos=1, out_dir=str(folder))
        out[workers] = evaluate(partial(make_agent, kind="expert"), cfg)
    return out


def test_expert_results_json_videos_and_identical_for_any_worker_count(expert_runs):
    one, two = expert_runs[1], expert_runs[2]
    assert comparable(one) == comparable(two)
    out = Path(two["config"]["out_dir"])
    assert json.loads((out / "results.json").read_text())["episodes"] == two["episodes"]
    assert [(e["task"], e["episode"]) for e in two["episodes"]] == [(t, e) for t in sorted(TASKS) for e in (0, 1)]
    assert all(is_eval_seed(e["seed"]) for e in two["episodes"])
    for task in TASKS:
        block = two["tasks"][task]
        assert block["success"]["rate"] == 1.0 and block["episodes"] == 2 and 0 < block["mean_length"] < 80
        assert block["success"]["ci95"] == list(wilson_interval(2, 2))
    videos = sorted((out / "videos").iterdir())
    assert [v.name for v in videos] == [f"{t}_ep0000.mp4" for t in sorted(TASKS)]
    with av.open(str(videos[0])) as container:  # a real, decodable video: one frame per step plus the first
        frames = list(container.decode(video=0))
    record = next(e for e in two["episodes"] if e.get("video") == str(videos[0]))
    assert len(frames) == record["length"] + 1 and frames[0].height >= 64
    for run in (one, two):  # start-up (spawn, imports, env, agent) is timed apart from the episode phase
        t = run["timing"]
        assert 0 < t["startup_s"] < t["wall_s"] and t["episodes_s"] == pytest.approx(t["wall_s"] - t["startup_s"])
        assert t["episodes_per_s"] == pytest.approx(6 / t["episodes_s"])
        assert t["episodes_per_s_overall"] < t["episodes_per_s"]


def test_random_agent_fails_and_is_identical_in_process_and_in_workers(tmp_path):
    cfg = EvalConfig(suite="instruct", tasks=["touch_red", "push_blue"], episodes=1, workers=2, videos=1)
    cfg.out_dir, cfg.video_format = str(tmp_path), "gif"
    workers = evaluate(partial(make_agent, kind="random"), cfg)
    cfg.workers, cfg.out_dir = 0, None
    inline = evaluate(partial(make_agent, kind="random"), cfg)
    assert comparable(workers) == comparable(inline)
    assert workers["overall"]["success"]["rate"] == 0.0 and workers["overall"]["mean_length"] == 80
    assert sorted(p.suffix for p in (tmp_path / "videos").iterdir()) == [".gif", ".gif"]


def test_swap_instruction_scores_the_named_task(tmp_path):
    cfg = EvalConfig(suite="instruct", tasks=TASKS, episodes=2, workers=2, swap_instruction=True)
    results = evaluate(partial(make_agent, kind="expert"), cfg)  # the expert does what the instruction names
    env_instruction = {"touch_red": "touch the red block", "touch_blue": "touch the blue block"}
    env_instruction["push_green"] = "push the green block to the goal"
    for e in results["episodes"]:
        assert e["named_task"] != e["task"] and e["instruction"] == env_instruction[e["named_task"]]
        assert e["followed"] and not e["original"]
    # a cyclic shift per episode: over 2 episodes every task is told both other tasks' instructions
    told = {(e["task"], e["named_task"]) for e in results["episodes"]}
    assert told == {(a, b) for a in TASKS for b in TASKS if a != b}
    assert results["overall"]["followed"]["rate"] == 1.0 and results["overall"]["original"]["rate"] == 0.0
    # the same scenes without the swap: the seeds match episode for episode
    plain = plan_jobs(task_names(), True, EvalConfig(suite="instruct", tasks=TASKS, episodes=2))
    assert sorted(j.seed for j in plain) == sorted(e["seed"] for e in results["episodes"])


def test_swap_instruction_needs_a_shared_scene_suite():
    cfg = EvalConfig(suite="metaworld", tasks=["reach-v3", "push-v3"], episodes=1, workers=0, swap_instruction=True)
    with pytest.raises(ValueError, match="share one scene"):
        evaluate(partial(make_agent, kind="expert"), cfg)


def test_worker_error_and_timeout_kill_the_workers(tmp_path):
    cfg = EvalConfig(suite="instruct", tasks=["touch_red"], episodes=2, workers=2)
    with pytest.raises(EvalError, match="no_such_export"):
        evaluate(partial(make_agent, kind="policy", path=str(tmp_path / "no_such_export")), cfg)
    assert not multiprocessing.active_children()
    cfg.timeout_s = 3.0  # a worker whose agent stalls is killed, whatever the machine's speed
    with pytest.raises(EvalError, match="finished no episode in 3 s"):
        evaluate(stalling_agent, cfg)
    assert not multiprocessing.active_children()


class StallingAgent(ExpertAgent):
    """An agent that never returns an action (a hung policy)."""

    def act(self, obs):  # noqa: ANN001, ANN201
        time.sleep(600)


def stalling_agent(env):  # noqa: ANN001, ANN201 - module level: spawned workers import it
    return StallingAgent()


def test_eval_cli_baseline_table_and_report(tmp_path, capsys):
    from vla_scale.cli import main as cli

    args = ["--suite", "instruct", "--tasks", "touch_red,push_blue", "--episodes", "2", "--workers", "0"]
    assert cli(["eval", "--agent", "expert", *args, "--videos", "0", "--out", str(tmp_path / "expert")]) == 0
    table = capsys.readouterr().out
    row = next(line for line in table.splitlines() if line.startswith("touch_red "))
    assert row.split()[:5] == ["touch_red", "100.0%", "[34.2%,", "100.0%]", "2"]  # Wilson(2 of 2) = [0.342, 1]
    assert "overall" in table
    assert cli(["eval", "--agent", "random", *args, "--swap-instruction", "--out", str(tmp_path / "rnd")]) == 0
    assert "did original task" in capsys.readouterr().out
    assert cli(["eval-report", str(tmp_path / "expert"), str(tmp_path / "rnd" / "results.json")]) == 0
    report = capsys.readouterr().out.splitlines()
    assert report[2].split()[:3] == ["expert", "instruct", "expert"] and report[3].split()[:3] == [
        "rnd",
        "instruct",
        "random",
    ]
    assert cli(["eval", *args, "--out", str(tmp_path / "x")]) == 2  # the policy agent needs PATH
    assert "give PATH" in capsys.readouterr().err


# ----- `vla-scale eval` on a tiny trained policy -----------------------------------------------------


@pytest.mark.integration
def test_vla_scale_eval_on_a_tiny_trained_policy(tmp_path, capsys):
    """Collect instruct demonstrations, train the debug model 2 steps on 2 ranks, export, evaluate with 2 workers.

    The model carries the closed-loop recipe's mechanisms (FiLM, spatial keypoints, image-token pooling), so they
    go through ZeRO, export and the policy in the evaluation workers too."""
    from tests.train.jobs import run_ranks
    from vla_scale.cli import main as cli

    data = tmp_path / "data"
    collect = ["collect", "instruct", str(data), "--tasks", "touch_red,touch_blue", "--episodes", "2"]
    assert data_tools_main([*collect, "--image-size", "32", "--grounding", "4"]) == 0
    recipe = ["model.film=true", "model.keypoints=4", "model.image_pool=2"]
    run_dir = run_ranks(tmp_path, data, "run.name=evalcli", "wandb.mode=disabled", "train.max_steps=2", *recipe).run_dir
    export = tmp_path / "policy"
    assert cli(["export", str(run_dir), str(export)]) == 0
    common = ["--suite", "instruct", "--tasks", "touch_red,touch_blue", "--episodes", "1", "--image-size", "32"]
    common += ["--exec-steps", "2", "--ensemble"]  # the debug model predicts 2-step chunks
    capsys.readouterr()
    assert cli(["eval", str(export), *common, "--workers", "2", "--videos", "1", "--out", str(tmp_path / "w2")]) == 0
    printed = capsys.readouterr().out
    assert "touch_red" in printed and "overall" in printed and "results:" in printed
    two = json.loads((tmp_path / "w2" / "results.json").read_text())
    assert two["config"]["agent"] == f"policy {export.resolve()}" and len(two["episodes"]) == 2
    videos = sorted(p.name for p in (tmp_path / "w2" / "videos").iterdir())
    assert videos == ["touch_blue_ep0000.mp4", "touch_red_ep0000.mp4"]
    # a run directory works too (exported once, before the workers start), and 1 worker gives the same results
    assert cli(["eval", str(run_dir), *common, "--workers", "1", "--videos", "0", "--out", str(tmp_path / "w1")]) == 0
    one = json.loads((tmp_path / "w1" / "results.json").read_text())
    assert comparable(one) == comparable(two)
