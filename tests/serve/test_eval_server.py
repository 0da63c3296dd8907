"""Closed loop through the server: the served policy acts exactly like the same export loaded in-process, action
for action on the same seeded instruct episodes, and `vla-scale eval --server` gives the in-process results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.eval.test_runner import comparable
from tests.serve.conftest import CHUNK
from vla_scale.cli import main as cli
from vla_scale.eval.agents import Agent, make_agent
from vla_scale.eval.registry import make_env
from vla_scale.eval.runner import EpisodeJob, run_episode
from vla_scale.eval.seeds import eval_seed
from vla_scale.serve.server import load_server

TASKS = ("touch_red", "push_blue")


@pytest.fixture(scope="module")
def server(export_dir, one_thread):
    with load_server(export_dir, port=0) as srv:
        yield srv


class Recording(Agent):
    """Wraps an agent and keeps every action it returns."""

    def __init__(self, agent):  # noqa: ANN001
        self.agent, self.actions = agent, []
        self.needs_images = agent.needs_images

    def reset(self, env, seed):  # noqa: ANN001, ANN201
        self.agent.reset(env, seed)

    def act(self, obs):  # noqa: ANN001, ANN201
        self.actions.append(self.agent.act(obs))
        return self.actions[-1]

    def episode_info(self):  # noqa: ANN201
        return self.agent.episode_info()


@pytest.mark.parametrize("exec_steps", [1, 3])
def test_served_policy_acts_like_the_in_process_policy(server, export_dir, exec_steps):
    env = make_env("instruct", image_size=64)
    try:
        records, actions = [], []
        for kind in ("local", "server"):
            url = server.url if kind == "server" else None
            agent = make_agent(env, "policy", path=str(export_dir), exec_steps=exec_steps, server=url)
            rec = Recording(agent)
            for e, task in enumerate(TASKS):
                job = EpisodeJob(task, env.tasks.index(task), e, eval_seed(env.tasks.index(task), e), task, None)
                records.append(run_episode(env, rec, job))
            agent.close()
            actions.append(np.stack(rec.actions))
    finally:
        env.close()
    assert type(agent).__name__ == "ServerPolicyAgent"
    half = len(records) // 2
    assert records[:half] == records[half:]
    assert actions[0].shape == (sum(r["length"] for r in records[:half]), 4)
    np.testing.assert_array_equal(actions[0], actions[1])


def test_vla_scale_eval_through_a_server_equals_in_process(server, export_dir, tmp_path, capsys):
    args = ["--suite", "instruct", "--tasks", ",".join(TASKS), "--episodes", "1", "--videos", "0", "--exec-steps", "4"]
    assert cli(["eval", str(export_dir), *args, "--workers", "1", "--out", str(tmp_path / "local")]) == 0
    # two worker processes: two concurrent clients, each with its own episode state on the server
    assert cli(["eval", "--server", server.url, *args, "--workers", "2", "--out", str(tmp_path / "served")]) == 0
    assert "overall" in capsys.readouterr().out
    local, served = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("local", "served"))
    assert comparable(served) == comparable(local) and len(served["episodes"]) == 2
    assert served["config"]["agent"] == f"policy {server.url}"
    bad = ["eval", "--server", "ws://127.0.0.1:1", *args, "--workers", "0", "--out", str(tmp_path / "x")]
    assert cli(bad) == 2 and "vla-scale eval: error" in capsys.readouterr().err  # nobody listens there


@pytest.fixture(scope="module")
def flow_server(flow_export_dir, one_thread):
    with load_server(flow_export_dir, port=0) as srv:
        yield srv


def run_policy(env, agent, episodes: int = 2) -> tuple[list[dict], np.ndarray]:  # noqa: ANN001
    """Seeded instruct episodes of `agent` (closed afterwards): their records and every action taken."""
    rec, records = Recording(agent), []
    for e in range(episodes):
        task = TASKS[e % len(TASKS)]
        job = EpisodeJob(task, env.tasks.index(task), e, eval_seed(env.tasks.index(task), e), task, None)
        records.append(run_episode(env, rec, job))
    agent.close()
    return records, np.stack(rec.actions)


@pytest.mark.parametrize("rtc", [False, True])
def test_simulated_delay_acts_the_same_served_and_in_process(flow_server, flow_export_dir, rtc):
    env = make_env("instruct", image_size=64)
    try:
        local, served = (
            run_policy(
                env, make_agent(env, "policy", path=str(flow_export_dir), delay=2, overlap=3, rtc=rtc, server=url)
            )
            for url in (None, flow_server.url)
        )
    finally:
        env.close()
    assert local[0] == served[0]
    np.testing.assert_array_equal(local[1], served[1])
    for r in local[0]:  # the first step waits for the first chunk; each later chunk lost its 2 stale rows
        assert r["stalled_steps"] == 1 and r["stale_rows_skipped"] == 2 * r["chunk_switches"]
        # chunk k > 0 is requested at step k (CHUNK - 3) and takes over 2 steps later
        assert r["chunk_switches"] == (r["length"] - 1 - 2) // (CHUNK - 3)
        assert r["chunk_switches"] + r["steps_within_chunks"] == r["length"] - 1


def test_real_time_chunking_makes_a_new_chunk_continue_the_plan_it_replaces(flow_export_dir):
    """Same seeds, same delay: with real-time chunking a new chunk's first executed action stays near what the
    replaced chunk planned for that step (random weights: without it, two samples apart)."""
    env = make_env("instruct", image_size=64)
    try:
        departure = {}
        for rtc in (False, True):
            agent = make_agent(env, "policy", path=str(flow_export_dir), delay=2, overlap=4, rtc=rtc)
            records, _ = run_policy(env, agent, episodes=4)
            n = sum(r["planned_switches"] for r in records)
            assert n == sum(r["chunk_switches"] for r in records) > 0  # overlap >= delay: always still covered
            departure[rtc] = sum(r["switch_departure"] * r["planned_switches"] for r in records) / n
    finally:
        env.close()
    assert departure[True] < 0.5 * departure[False], departure


def test_eval_cli_checks_the_execution_options(export_dir, history_export_dir, tmp_path, capsys):
    base = ["--suite", "instruct", "--tasks", "touch_red", "--episodes", "1", "--videos", "0", "--workers", "0"]
    cases = [
        ([str(export_dir), "--overlap", "2"], "need --delay"),
        ([str(export_dir), "--delay", "3", "--overlap", "2"], "--overlap 2 < --delay 3"),
        ([str(export_dir), "--delay", "2", "--exec-steps", "4"], "drop --exec-steps"),
        ([str(export_dir), "--delay", "2", "--rtc"], "needs a flow policy"),
        ([str(history_export_dir), "--delay", "2"], "frame history or a recurrent head"),
        (["--agent", "random", "--delay", "2"], "apply to --agent policy only"),
    ]
    for args, message in cases:
        assert cli(["eval", *args, *base, "--out", str(tmp_path / "x")]) == 2, args
        assert message in capsys.readouterr().err, args
    assert cli(["eval", str(export_dir), *base, "--delay", "2", "--overlap", "3", "--out", str(tmp_path / "ok")]) == 0
    out = capsys.readouterr().out
    assert "chunk switches" in out and "replaced chunk's plan" in out and "stalled steps" in out
    results = json.loads((tmp_path / "ok" / "results.json").read_text())
    assert results["config"]["delay"] == 2 and results["overall"]["stalled_steps"] == 1
