"""`data_tools collect`: expert rollouts of the instruct suite → shards that verify, identical for any worker count."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools.__main__ import main
from data_tools.collect import grid_cell, plan_sources
from data_tools.stats import compare_stats, recompute_stats
from data_tools.verify import verify
from vla_scale.data.format import Manifest, decode_episode, decode_vl
from vla_scale.eval.instruct import task_names
from vla_scale.eval.seeds import collect_seed, is_eval_seed

TASKS = ["touch_red", "push_blue"]
ARGS = ["--tasks", ",".join(TASKS), "--episodes", "2", "--grounding", "3", "--episodes-per-shard", "3"]


def sha256s(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def read(folder: Path) -> list[dict]:
    manifest = Manifest.load(folder)
    return list(wds.WebDataset([str(folder / s.path) for s in manifest.shards], shardshuffle=False))


@pytest.fixture(scope="module")
def collected(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """The same collection with 1 and with 2 workers."""
    out = {}
    for workers in (1, 2):
        folder = tmp_path_factory.mktemp(f"collect_w{workers}")
        assert main(["collect", "instruct", str(folder), *ARGS, "--workers", str(workers)]) == 0
        out[workers] = folder
    return out


def test_shards_verify_and_are_identical_for_any_worker_count(collected):
    one, two = collected[1], collected[2]
    for kind in ("robot", "vl"):
        report = verify(one / kind)
        assert report.ok, [str(p) for p in report.problems]
    assert sha256s(one) == sha256s(two)
    assert sorted(sha256s(one)) == sorted(
        [f"robot/{n}" for n in ("manifest.json", "stats.json", "shard-000000.tar", "shard-000001.tar")]
        + ["vl/manifest.json", "vl/shard-000000.tar"]
    )


def test_episodes_are_successful_expert_demonstrations_on_collection_seeds(collected):
    robot = collected[1] / "robot"
    manifest = Manifest.load(robot)
    assert (manifest.kind, manifest.action_dim, manifest.state_dim, manifest.cameras) == ("robot", 4, 4, ["rgb_static"])
    assert manifest.image_size == [64, 64] and manifest.extra["suite"] == "instruct"
    episodes = [decode_episode(s) for s in read(robot)]
    assert [(e.meta["task"], e.meta["episode"]) for e in episodes] == [
        ("touch_red", 0), ("push_blue", 0), ("touch_red", 1), ("push_blue", 1)
    ]  # fmt: skip
    for ep in episodes:
        task_index = task_names().index(ep.meta["task"])  # in the suite's full task list, not in --tasks
        assert ep.meta["seed"] == collect_seed(task_index, ep.meta["episode"]) and not is_eval_seed(ep.meta["seed"])
        assert ep.instruction == (
            "touch the red block" if ep.meta["task"] == "touch_red" else "push the blue block to the goal"
        )
        assert ep.frames["rgb_static"][0].shape == (64, 64, 3) and np.abs(ep.action).max() <= 1.0
    # stats.json is what the stats tool recomputes from the shards
    assert compare_stats(json.loads((robot / "stats.json").read_text()), recompute_stats(robot)) == []


def test_grounding_set_answers_with_the_blocks_grid_cell(collected):
    samples = [decode_vl(s) for s in read(collected[1] / "vl")]
    assert len(samples) == 3
    cells = {"top left", "top centre", "top right", "middle left", "the centre", "middle right"}
    cells |= {"bottom left", "bottom centre", "bottom right"}
    for sample in samples:
        turns = sample.conversations
        assert turns[0]["value"].startswith("<image>\nWhere is the ") and len(turns) == 4
        for q, a in zip(turns[::2], turns[1::2], strict=True):
            colour = q["value"].split("Where is the ")[1].split()[0]
            assert colour in ("red", "green", "blue", "yellow") and a["value"].rstrip(".").lower() in cells
            # the answer's cell holds pixels of that block's colour
            rows, cols = _cell_slices(a["value"].rstrip(".").lower(), 64)
            patch = sample.image[rows, cols].astype(int)
            channel = {"red": (0, 1), "green": (1, 0), "blue": (2, 0), "yellow": (1, 2)}[colour]
            assert (patch[..., channel[0]] - patch[..., channel[1]] > 120).any(), (sample.key, q, a)


def _cell_slices(cell: str, size: int) -> tuple[slice, slice]:
    row, col = ("middle", "centre") if cell == "the centre" else cell.split()
    r, c = ("top", "middle", "bottom").index(row), ("left", "centre", "right").index(col)
    third = size / 3
    return slice(int(r * third), int((r + 1) * third) + 1), slice(int(c * third), int((c + 1) * third) + 1)


def test_grid_cell_boundaries():
    assert grid_cell(0, 0, 60, 60) == "top left"
    assert grid_cell(30, 30, 60, 60) == "the centre"
    assert grid_cell(59.9, 20, 60, 60) == "bottom centre"
    assert grid_cell(25, 70, 60, 60) == "middle right"  # outside the frame: clamped to the edge cell


def test_unknown_task_fails_clearly(tmp_path, capsys):
    assert main(["collect", "instruct", str(tmp_path / "x"), "--tasks", "fly_away", "--episodes", "1"]) == 2
    assert "unknown task(s) ['fly_away']" in capsys.readouterr().err


def test_paired_scenes_share_one_scene_per_episode_across_tasks():
    tasks = ["touch_red", "touch_blue"]
    paired = plan_sources(task_names(), tasks, 3, paired=True)
    first = collect_seed(0, 0)
    assert [(s.task, s.seed) for s in paired[:2]] == [("touch_red", first), ("touch_blue", first)]
    assert len({s.seed for s in paired}) == 3  # one scene per episode index, demonstrated once per task
    unpaired = plan_sources(task_names(), tasks, 3)
    assert len({s.seed for s in unpaired}) == 6


def test_paired_scenes_need_a_shared_scene_suite(tmp_path, capsys):
    args = ["--tasks", "reach-v3", "--episodes", "1", "--paired-scenes"]
    assert main(["collect", "metaworld", str(tmp_path / "out"), *args]) == 2
    assert "--paired-scenes needs a suite whose tasks share one scene" in capsys.readouterr().err


def test_action_noise_perturbs_the_path_but_labels_are_the_experts_action_at_each_visited_state(tmp_path):
    from vla_scale.eval.registry import make_env

    clean, noisy = tmp_path / "clean", tmp_path / "noisy"
    base = ["--tasks", "touch_green", "--episodes", "2"]
    assert main(["collect", "instruct", str(clean), *base]) == 0
    assert main(["collect", "instruct", str(noisy), *base, "--action-noise", "0.4"]) == 0
    assert Manifest.load(noisy / "robot").extra["action_noise"] == 0.4
    clean_eps = [decode_episode(s) for s in read(clean / "robot")]
    noisy_eps = [decode_episode(s) for s in read(noisy / "robot")]
    env = make_env("instruct", image_size=64)
    try:
        for c, n in zip(clean_eps, noisy_eps, strict=True):
            assert c.meta["seed"] == n.meta["seed"] and n.meta["action_noise"] == 0.4
            assert not np.array_equal(c.state[: len(n.state)][1:4], n.state[1:4])  # the noise moved the pusher
            # Touch tasks leave the blocks where they are until contact: put the pusher at each recorded state
            # and the expert gives the recorded label.
            env.reset("touch_green", n.meta["seed"])
            for state, label in zip(n.state[:-1], n.action[:-1], strict=True):
                env.data.mocap_pos[0] = state[:3]
                np.testing.assert_allclose(env.action_space.clip(env.expert_action()), label, atol=1e-6)
    finally:
        env.close()


def test_action_noise_out_of_range_is_refused(tmp_path, capsys):
    assert main(["collect", "instruct", str(tmp_path / "x"), "--tasks", "touch_red", "--action-noise", "2"]) != 0
    assert "--action-noise" in capsys.readouterr().err
