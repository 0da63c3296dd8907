"""Closed loop through the server: the served policy acts exactly like the same export loaded in-process, action
for action on the same seeded instruct episodes, and `vla-scale eval --server` gives the in-process results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.eval.test_runner import comparable
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
