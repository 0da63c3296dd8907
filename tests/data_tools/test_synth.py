"""The synthetic tabletop task is well-formed, deterministic, and solvable only from image + instruction."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from data_tools import synth as S
from data_tools.__main__ import main
from vla_scale.data.format import Episode, Manifest, VLSample, decode_episode, decode_vl, load_stats

SMALL = {"episodes": 12, "vl_samples": 8, "episodes_per_shard": 5, "vl_per_shard": 3, "progress": False}


def read(folder: Path) -> list[dict]:
    manifest = Manifest.load(folder)
    return list(wds.WebDataset([str(folder / s.path) for s in manifest.shards], shardshuffle=False))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth")
    S.synth(out, workers=1, **SMALL)
    return out


@pytest.fixture(scope="module")
def episodes(dataset: Path) -> list[Episode]:
    return [decode_episode(s) for s in read(dataset / "robot")]


def sha256s(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_layout_and_counts(dataset: Path, episodes: list[Episode]) -> None:
    robot, vl = Manifest.load(dataset / "robot"), Manifest.load(dataset / "vl")
    assert (robot.name, robot.kind, robot.cameras) == ("synth_tabletop", "robot", ["rgb_static"])
    assert (robot.action_dim, robot.state_dim, robot.image_size) == (4, 4, [64, 64])
    assert [s.samples for s in robot.shards] == [5, 5, 2]
    assert sum(s.frames for s in robot.shards) == sum(e.length for e in episodes)
    assert (vl.name, vl.kind, vl.num_samples, len(vl.shards)) == ("synth_vl", "vl", 8, 3)
    assert set(load_stats(dataset / "robot")) == {"action", "state"}
    assert len(episodes) == 12


def test_same_seed_same_bytes_for_any_worker_count(dataset: Path, tmp_path: Path) -> None:
    S.synth(tmp_path, workers=2, **SMALL)
    assert sha256s(tmp_path) == sha256s(dataset)
    other = tmp_path / "seed1"
    S.synth(other, seed=1, workers=1, **SMALL)
    assert sha256s(other / "robot") != sha256s(dataset / "robot")


def test_actions_are_state_differences(episodes: list[Episode]) -> None:
    for ep in episodes:
        assert ep.state.dtype == ep.action.dtype == np.float32
        assert 14 <= ep.length <= 32
        np.testing.assert_array_equal(ep.state[1:, :3], ep.state[:-1, :3] + ep.action[:-1, :3])
        np.testing.assert_array_equal(ep.state[1:, 3], ep.action[:-1, 3])
        assert np.all(np.linalg.norm(ep.action[:, :2], axis=1) <= S.MAX_STEP + 1e-6)
        assert np.all(ep.action[:, 2] <= 0) and np.all(ep.action[:, 2] >= -S.MAX_DZ - 1e-6)


def test_actions_move_to_the_instructed_object_and_grasp(episodes: list[Episode]) -> None:
    for ep in episodes:
        objects, target = ep.meta["objects"], ep.meta["target_index"]
        target_xy = np.array(ep.meta["target_xy"])
        assert objects[target]["xy"] == ep.meta["target_xy"]
        assert objects[target]["colour"] in ep.instruction
        assert not any(o["colour"] in ep.instruction for i, o in enumerate(objects) if i != target)

        dist = np.linalg.norm(ep.state[:, :2] - target_xy, axis=1)
        closing = np.flatnonzero(ep.action[:, 3] > 0.5)
        first = int(closing[0])
        for t in range(first):  # every move gets closer to the named object, then stays on it
            assert dist[t + 1] < dist[t] if dist[t] > 1e-4 else dist[t + 1] < 1e-4
        assert dist[first] < 1e-4 and abs(ep.state[first, 2] - S.Z_GRASP) < 1e-4  # closes at the target
        np.testing.assert_array_equal(closing, np.arange(first, ep.length))  # ...and holds it closed
        assert ep.length - first == S.HOLD_STEPS + 1
        assert np.all(ep.action[first:, :3] == 0)
        assert np.all(ep.action[:first, 3] == 0) and np.all(ep.state[: first + 1, 3] == 0)
        # descends while approaching, never climbs, never goes below the grasp height
        assert np.all(np.diff(ep.state[:, 2]) <= 1e-7)
        assert np.all(ep.state[:, 2] >= S.Z_GRASP - 1e-6)


def test_targets_vary_and_distractors_are_present(episodes: list[Episode]) -> None:
    assert len({ep.meta["target_colour"] for ep in episodes}) >= 3
    assert len({ep.meta["target_index"] for ep in episodes}) >= 2
    assert len({ep.instruction.split(" the ")[0] for ep in episodes}) >= 3  # paraphrases
    for ep in episodes:
        assert len({o["colour"] for o in ep.meta["objects"]}) == 3


def test_rendered_objects_are_where_meta_says(episodes: list[Episode]) -> None:
    for ep in episodes:
        frame = ep.frames["rgb_static"][0]
        size = frame.shape[0]
        for i, obj in enumerate(ep.meta["objects"]):
            row, col = int(obj["xy"][1] * size), int(obj["xy"][0] * size)
            rgb = S.PALETTE[obj["colour"]]
            if i == ep.meta["target_index"]:  # the gripper starts away from the target: exact pixel
                np.testing.assert_array_equal(frame[row, col], rgb, err_msg=f"{ep.key} {obj}")
            else:  # the thin gripper ring may cross a distractor: most of the 3x3 patch is its colour
                patch = frame[row - 1 : row + 2, col - 1 : col + 2]
                assert np.all(patch == rgb, axis=-1).sum() >= 5, f"{ep.key} {obj}"
        # The gripper ring is drawn: some pixels carry its colour, and it moves.
        assert np.all(frame == S.EE_RGB, axis=-1).any()
        assert not np.array_equal(frame, ep.frames["rgb_static"][-1])


def test_episode_is_a_pure_function_of_seed_and_index() -> None:
    a, b = S.make_episode(3, 7), S.make_episode(3, 7)
    np.testing.assert_array_equal(a.action, b.action)
    np.testing.assert_array_equal(a.frames["rgb_static"][5], b.frames["rgb_static"][5])
    wrist = S.make_episode(3, 7, image_size=32, wrist=True)
    assert sorted(wrist.frames) == ["rgb_static", "rgb_wrist"]
    assert wrist.frames["rgb_wrist"][0].shape == (32, 32, 3)
    np.testing.assert_array_equal(wrist.action, a.action)


def test_vl_conversations(dataset: Path) -> None:
    samples: list[VLSample] = [decode_vl(s) for s in read(dataset / "vl")]
    assert len(samples) == 8
    for s in samples:
        assert s.image.shape == (64, 64, 3)
        conv = s.conversations
        assert len(conv) in (2, 4)
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert all(t["value"].strip() for t in conv)


def test_vl_answers_match_the_image() -> None:
    for i in range(30):
        s = S.make_vl_sample(0, i)
        shown = {c for c, rgb in S.PALETTE.items() if np.all(s.image == rgb, axis=-1).any()}
        assert len(shown) == 3
        for q, a in zip(s.conversations[::2], s.conversations[1::2], strict=True):
            question, answer = q["value"].removeprefix("<image>\n"), a["value"]
            if question.startswith("Is there"):
                colour = question.split()[3]
                assert answer == ("Yes." if colour in shown else "No.")
            elif question.startswith("What colour"):
                assert answer.rstrip(".").lower() in shown
            elif question in ("Describe the image.", "What is on the table?", "Describe the scene briefly."):
                assert {c for c in S.PALETTE if c in answer.lower()} == shown


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["synth", str(tmp_path), "--episodes", "3", "--vl-samples", "2", "--image-size", "32"]
    assert main(args) == 0
    assert "3 samples" in capsys.readouterr().out
    assert Manifest.load(tmp_path / "robot").image_size == [32, 32]
    assert main(args) == 2  # refuses to overwrite silently
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["synth", str(blocker / "out"), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "error: cannot create dataset folder" in err and str(blocker) in err


def test_action_follows_from_image_and_instruction(episodes: list[Episode]) -> None:
    """Learnable, and only with the instruction: the named colour's blob in the frame (plus the
    state) gives the action direction; the distractors' blobs do not."""
    target_cos, distractor_cos = [], []
    for ep in episodes:
        first = int(np.flatnonzero(ep.action[:, 3] > 0.5)[0])
        for t in range(first):
            frame, move = ep.frames["rgb_static"][t], ep.action[t, :2]
            if np.linalg.norm(move) < 1e-6:
                continue  # on top of the target: only the descent is left
            for i, obj in enumerate(ep.meta["objects"]):
                rows, cols = np.nonzero(np.all(frame == S.PALETTE[obj["colour"]], axis=-1))
                to_blob = np.array([cols.mean() + 0.5, rows.mean() + 0.5]) / frame.shape[0] - ep.state[t, :2]
                if np.linalg.norm(to_blob) < 0.05:
                    continue
                cos = float(to_blob @ move / np.linalg.norm(to_blob) / np.linalg.norm(move))
                (target_cos if i == ep.meta["target_index"] else distractor_cos).append(cos)
    assert min(target_cos) > 0.8  # noisy expert, ring over the blob: not exactly 1
    assert np.mean(distractor_cos) < 0.5
