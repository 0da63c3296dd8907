"""Learning check: does a policy trained on the synthetic tabletop task follow the instruction on new scenes?

    .venv/bin/python tests/benchmarks/learning_check.py [--work runs/learning_check]

A falling training loss does not show that a policy learned the task: the tiny CPU model
can memorise its training episodes (README, "demo"). This script generates a toy data set
with `data_tools.synth` (training episodes plus a held-out set from another seed), trains
one model per action space through the real `launchers/train.sh` (2 CPU ranks) and then,
on the held-out scenes only:

- compares the un-normalised arm action chunk with the expert's, against predicting the
  training set's mean action everywhere (a model that learned nothing scores ratio ~1);
- swaps the instruction for one naming another object of the same scene and checks whether
  the predicted first xy move then points more toward the newly named object than toward
  the original target (same check with the original instruction as a sanity reference).

An instruction-blind model makes the same move under both instructions, so for each pair it
follows exactly one of them (original + swapped = 1, "instruction effect" 0); one that grounds
the colour word in the image follows both (effect 1). The direction is taken at the first
frame, where no history exists: later in an episode the previous frame and state already show
where the gripper is heading, so a low action error alone does not prove grounding.
Figures are printed as a table and written to `<work>/learning_check.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from data_tools.shards import iter_dataset
from data_tools.synth import NOUNS, synth
from vla_scale.data.collate import collate_robot
from vla_scale.data.format import Episode, Manifest, decode_episode, load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.data.stream import WRIST_CAMERA
from vla_scale.data.window import Window, chunk_actions
from vla_scale.model import RoboVLM
from vla_scale.train.export import build_run_model

REPO = Path(__file__).resolve().parents[2]
BASE_CONFIG = "configs/demo_cpu.yaml"
ARM_DIMS = 3  # dx, dy, dz; the last action dim is the gripper

# One model per action space, as overrides on the demo config. Both use a 2-frame window.
# Discrete: 128 bins keep the action ids (the last 128 of the tiny LM's 512-token vocabulary)
# clear of the colour-word ids (322-331), so the instruction's colour keeps its own embedding;
# [-4, 4] covers the z-scored actions (the demo data's q01/q99 are about -3.6 / 3.5 std).
MODELS: dict[str, list[str]] = {
    "continuous": [
        "model.action_space=continuous",
        "model.history_type=post",
        "model.head.type=gpt",
        "model.head.num_layers=2",
        "model.head.num_heads=4",
        "data.window_size=2",
    ],
    "discrete": [
        "model.action_space=discrete",
        "model.history_type=pre",
        "model.head.type=mlp",
        "model.discrete.n_bin=128",
        "model.discrete.min_action=-4.0",
        "model.discrete.max_action=4.0",
        "data.window_size=2",
    ],
}


@dataclass
class DataPaths:
    train_robot: Path
    train_vl: Path
    heldout_robot: Path


@dataclass
class ModelResult:
    """What the final table and JSON report per model."""

    name: str
    run_dir: str
    overrides: list[str]
    train_wall_s: float | None
    first_loss: float | None
    last_loss: float | None
    heldout_mse: float
    heldout_baseline_mse: float
    heldout_ratio: float
    train_mse: float
    train_baseline_mse: float
    train_ratio: float
    follow_original: float
    follow_swapped: float
    instruction_effect: float
    argmax_original: float
    argmax_swapped: float
    cos_named_original: float
    cos_named_swapped: float
    pairs: int


# --- data -------------------------------------------------------------------------------------


def generate_data(work: Path, train_episodes: int, heldout_episodes: int, vl_samples: int, seed: int) -> DataPaths:
    """Training set (robot + VL, as in the demo) from `seed`, held-out robot set from `seed + 1000`.

    Regenerated only when missing or of another size, since it is a pure function of its arguments.
    """
    data = work / "data"
    paths = DataPaths(data / "train" / "robot", data / "train" / "vl", data / "heldout" / "robot")
    jobs = (
        (data / "train", train_episodes, vl_samples, seed, paths.train_robot),
        (data / "heldout", heldout_episodes, 0, seed + 1000, paths.heldout_robot),
    )
    for out, episodes, vl, s, robot in jobs:
        if (robot / "manifest.json").is_file() and Manifest.load(robot).num_samples == episodes:
            continue
        start = time.perf_counter()
        synth(out, episodes=episodes, vl_samples=vl, seed=s, workers=2, overwrite=True, progress=False)
        print(f"generated {out} ({episodes} episodes, {vl} VL samples, seed {s}) in {time.perf_counter() - start:.0f}s")
    return paths


def read_episodes(folder: Path, limit: int | None = None) -> list[Episode]:
    """Decoded episodes of a robot data set, in shard order (object positions are in `meta`)."""
    out: list[Episode] = []
    for _, sample in iter_dataset(folder):
        if limit is not None and len(out) >= limit:
            break
        out.append(decode_episode(sample))
    return out


# --- training ---------------------------------------------------------------------------------


def train_command(name: str, overrides: list[str], work: Path, data: DataPaths, steps: int) -> list[str]:
    """`launchers/train.sh` on the demo config, pointed at this check's data and run folder."""
    return [
        "launchers/train.sh",
        BASE_CONFIG,
        f"run.name={name}",
        f"run.output_dir={work / 'runs'}",
        f"data.sources.0.path={data.train_robot}",
        f"data.sources.1.path={data.train_vl}",
        f"train.max_steps={steps}",
        "train.ckpt_every=0",
        "wandb.mode=disabled",
        *overrides,
    ]


def train(command: list[str], run_dir: Path, log: Path) -> float:
    """Train from scratch (2 CPU ranks); the launcher's output goes to `log`. Returns the wall time."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a leftover run would be resumed, not retrained
    env = {**os.environ, "CPU_RANKS": "2"}
    print(f"training: {shlex.join(command)}  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(command, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, check=False)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"training failed (exit {proc.returncode}); see {log}")
    return wall


def loss_curve(run_dir: Path) -> tuple[float | None, float | None]:
    """First and last logged `loss` (robot + VL terms as weighted in training)."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in lines if '"loss"' in line]
    return (losses[0], losses[-1]) if losses else (None, None)


# --- prediction -------------------------------------------------------------------------------


def episode_windows(ep: Episode, norm: Normalizer, camera: str, window: int, chunk: int) -> list[Window]:
    """Training-style windows of `window` frames (fewer at the episode start, which causal history models
    see the same way) ending at every frame, so each frame is predicted once with its full history."""
    chunks, mask = chunk_actions(norm.normalize_action(ep.action), chunk)
    state = norm.normalize_state(ep.state)
    images = np.stack(ep.frames[camera])
    out = []
    for t in range(ep.length):
        sl = slice(max(0, t - window + 1), t + 1)
        out.append(Window(f"{ep.key}/{t}", ep.instruction, images[sl], None, state[sl], chunks[sl], mask[sl]))
    return out


def predict_last(model: RoboVLM, windows: list[Window], norm: Normalizer, max_text_len: int, batch: int) -> np.ndarray:
    """Un-normalised arm chunk `[len(windows), N, 3]` for the last frame of each window.

    Windows are batched by length (collate needs equal frame counts); order is kept.
    """
    out: list[np.ndarray | None] = [None] * len(windows)
    by_len: dict[int, list[int]] = {}
    for i, w in enumerate(windows):
        by_len.setdefault(len(w.images), []).append(i)
    for idx in by_len.values():
        for start in range(0, len(idx), batch):
            part = idx[start : start + batch]
            b = collate_robot([windows[i] for i in part], model.tokenizer, max_text_len)
            arm, grip = model.predict_action(b.observation)
            raw = norm.unnormalize_action(arm[:, -1].numpy(), grip[:, -1].numpy())[..., :ARM_DIMS]
            for j, i in enumerate(part):
                out[i] = raw[j]
    return np.stack(out)  # type: ignore[arg-type]


# --- metrics ----------------------------------------------------------------------------------


def action_errors(
    model: RoboVLM, episodes: list[Episode], norm: Normalizer, camera: str, window: int, max_text_len: int, batch: int
) -> tuple[float, float]:
    """(model MSE, mean-action MSE) of the arm chunk over every frame and valid chunk step, in robot units.

    The baseline predicts the training set's mean arm action everywhere: what a model that
    ignores its inputs converges to under an MSE loss.
    """
    chunk = model.chunk_size
    sq_model, sq_base, count = 0.0, 0.0, 0
    windows = [w for ep in episodes for w in episode_windows(ep, norm, camera, window, chunk)]
    pred = predict_last(model, windows, norm, max_text_len, batch)
    mean = norm.action.centre[:ARM_DIMS]
    row = 0
    for ep in episodes:
        target, mask = chunk_actions(ep.action[:, :ARM_DIMS], chunk)
        p = pred[row : row + ep.length]
        row += ep.length
        sq_model += float(((p - target) ** 2)[mask].sum())
        sq_base += float(((mean - target) ** 2)[mask].sum())
        count += int(mask.sum()) * ARM_DIMS
    return sq_model / count, sq_base / count


def swapped_instruction(ep: Episode, new: int) -> str:
    """The episode's instruction naming object `new` instead of the target, same template and noun kind.

    Every synth template ends with "{colour} {noun}"; the noun tuples of both shapes are aligned
    (block/disc, cube/puck, object/object), so the wording changes only where the object does.
    """
    objects, target = ep.meta["objects"], ep.meta["target_index"]
    head, colour, noun = ep.instruction.rsplit(" ", 2)
    assert colour == objects[target]["colour"], f"{ep.key}: unexpected instruction {ep.instruction!r}"
    new_noun = NOUNS[objects[new]["shape"]][NOUNS[objects[target]["shape"]].index(noun)]
    return f"{head} {objects[new]['colour']} {new_noun}"


def cosines(move_xy: np.ndarray, ep: Episode) -> np.ndarray:
    """Cosine between a first-step xy move and the direction from the start position to each object."""
    to_obj = np.array([o["xy"] for o in ep.meta["objects"]]) - ep.state[0, :2]
    denom = np.linalg.norm(to_obj, axis=1) * max(float(np.linalg.norm(move_xy)), 1e-9)
    return to_obj @ move_xy / denom


@dataclass
class Following:
    """Per (episode, other object) pair: does the first move point at the object the instruction names?"""

    follow_original: float  # original instruction: closer (in angle) to the target than to the other object
    follow_swapped: float  # instruction naming the other object: closer to it than to the original target
    argmax_original: float  # the named object is the best-aligned of all three (chance 1/3)
    argmax_swapped: float
    cos_named_original: float  # mean cosine toward the named object
    cos_named_swapped: float
    pairs: int


def instruction_following(
    model: RoboVLM, episodes: list[Episode], norm: Normalizer, camera: str, max_text_len: int, batch: int
) -> Following:
    """First-step predictions with the original and with each swapped instruction (first frame only)."""
    jobs: list[tuple[Episode, int, int]] = []  # (episode, named object, original target)
    windows: list[Window] = []
    for ep in episodes:
        first = episode_windows(ep, norm, camera, 1, model.chunk_size)[0]
        target = ep.meta["target_index"]
        for named in range(len(ep.meta["objects"])):
            text = ep.instruction if named == target else swapped_instruction(ep, named)
            windows.append(Window(first.key, text, first.images, None, first.state, first.action, first.action_mask))
            jobs.append((ep, named, target))
    moves = predict_last(model, windows, norm, max_text_len, batch)[:, 0, :2]
    cos = {(ep.key, named): cosines(m, ep) for (ep, named, _), m in zip(jobs, moves, strict=True)}
    res: dict[str, list[float]] = {k: [] for k in ("fo", "fs", "ao", "as", "co", "cs")}
    for ep, named, target in jobs:
        if named == target:
            continue
        orig, swap = cos[(ep.key, target)], cos[(ep.key, named)]
        res["fo"].append(orig[target] > orig[named])
        res["fs"].append(swap[named] > swap[target])
        res["ao"].append(int(np.argmax(orig)) == target)
        res["as"].append(int(np.argmax(swap)) == named)
        res["co"].append(orig[target])
        res["cs"].append(swap[named])
    m = {k: float(np.mean(v)) for k, v in res.items()}
    return Following(m["fo"], m["fs"], m["ao"], m["as"], m["co"], m["cs"], len(res["fo"]))


def expert_following(episodes: list[Episode]) -> float:
    """The expert's own first move, checked the same way: the metric's ceiling (should be 1.0)."""
    hits = []
    for ep in episodes:
        cos, target = cosines(ep.action[0, :2].astype(np.float64), ep), ep.meta["target_index"]
        hits += [cos[target] > cos[j] for j in range(len(cos)) if j != target]
    return float(np.mean(hits))


# --- report -----------------------------------------------------------------------------------


def evaluate(name: str, run_dir: Path, data: DataPaths, args: argparse.Namespace) -> dict:
    """Load the run's final checkpoint and compute every figure on held-out (and, for contrast, training) scenes."""
    model, cfg = build_run_model(run_dir)
    norm = Normalizer(load_stats(data.train_robot))  # the model predicts in the training set's units
    camera = next(c for c in Manifest.load(data.train_robot).cameras if c != WRIST_CAMERA)
    heldout = read_episodes(data.heldout_robot)
    train_eps = read_episodes(data.train_robot, limit=args.eval_train_episodes)
    common = {"norm": norm, "camera": camera, "max_text_len": cfg.data.max_text_len, "batch": args.eval_batch}
    start = time.perf_counter()
    with torch.no_grad():
        h_mse, h_base = action_errors(model, heldout, window=cfg.data.window_size, **common)
        t_mse, t_base = action_errors(model, train_eps, window=cfg.data.window_size, **common)
        follow = instruction_following(model, heldout, **common)
    print(f"evaluated {name} in {time.perf_counter() - start:.0f}s")
    return {
        "heldout_mse": h_mse,
        "heldout_baseline_mse": h_base,
        "heldout_ratio": h_mse / h_base,
        "train_mse": t_mse,
        "train_baseline_mse": t_base,
        "train_ratio": t_mse / t_base,
        # An instruction-blind model makes the same move under both instructions, so per pair it follows
        # exactly one of them: follow_original + follow_swapped = 1, effect 0. Perfect grounding: effect 1.
        "instruction_effect": follow.follow_original + follow.follow_swapped - 1.0,
        **asdict(follow),
    }


def print_table(results: list[ModelResult], expert: float, meta: dict) -> None:
    """The figures side by side, then how they were produced."""
    rows = [
        ("train wall time (s)", "train_wall_s", "{:.0f}"),
        ("first / last train loss", None, ""),
        ("arm chunk MSE, held-out", "heldout_mse", "{:.3e}"),
        ("  mean-action baseline", "heldout_baseline_mse", "{:.3e}"),
        ("  ratio (1 = learned nothing)", "heldout_ratio", "{:.3f}"),
        ("arm chunk MSE ratio, train scenes", "train_ratio", "{:.3f}"),
        ("follows original instr. (pairwise)", "follow_original", "{:.3f}"),
        ("follows swapped instr. (pairwise)", "follow_swapped", "{:.3f}"),
        ("instruction effect (orig+swap-1)", "instruction_effect", "{:.3f}"),
        ("named obj best of 3, original", "argmax_original", "{:.3f}"),
        ("named obj best of 3, swapped", "argmax_swapped", "{:.3f}"),
        ("mean cos to named obj, original", "cos_named_original", "{:.3f}"),
        ("mean cos to named obj, swapped", "cos_named_swapped", "{:.3f}"),
    ]
    width = 38
    print("\n" + "learning check".ljust(width) + "".join(r.name.rjust(14) for r in results))
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{r.first_loss:.3f}/{r.last_loss:.3f}" if r.first_loss is not None else "-" for r in results]
        else:
            cells = ["-" if getattr(r, key) is None else fmt.format(getattr(r, key)) for r in results]
        print(label.ljust(width) + "".join(c.rjust(14) for c in cells))
    print(
        f"(pairs per model: {results[0].pairs}; chance: pairwise ~0.5, effect 0, best of 3 ~0.33; "
        f"expert's own first move, pairwise: {expert:.3f})"
    )
    print(
        f"data: {meta['train_episodes']} training episodes (seed {meta['seed']}), "
        f"{meta['heldout_episodes']} held-out (seed {meta['seed'] + 1000}); steps: {meta['steps']}"
    )
    for r in results:
        print(f"{r.name}: {shlex.join(meta['commands'][r.name])}")
    print(f"command: {meta['command']}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/learning_check", help="data, runs and report go here (default: %(default)s)")
    p.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    p.add_argument("--train-episodes", type=int, default=400, help="(default: %(default)s, as in the demo)")
    p.add_argument("--vl-samples", type=int, default=200, help="(default: %(default)s)")
    p.add_argument("--heldout-episodes", type=int, default=100, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="training-data seed; held-out uses seed + 1000")
    p.add_argument("--steps-continuous", type=int, default=3000, help="(default: %(default)s)")
    p.add_argument("--steps-discrete", type=int, default=3000, help="(default: %(default)s)")
    p.add_argument("--eval-train-episodes", type=int, default=100, help="training episodes scored for contrast")
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--skip-train", action="store_true", help="evaluate the runs already in WORK/runs")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = generate_data(work, args.train_episodes, args.heldout_episodes, args.vl_samples, args.seed)
    steps = {"continuous": args.steps_continuous, "discrete": args.steps_discrete}
    commands, results = {}, []
    for name in args.models:
        run_dir = work / "runs" / name
        commands[name] = train_command(name, MODELS[name], work, data, steps[name])
        wall = None if args.skip_train else train(commands[name], run_dir, work / f"train_{name}.log")
        first, last = loss_curve(run_dir)
        figures = evaluate(name, run_dir, data, args)
        results.append(ModelResult(name, str(run_dir), MODELS[name], wall, first, last, **figures))
    expert = expert_following(read_episodes(data.heldout_robot))
    meta = {
        "command": shlex.join([".venv/bin/python", "tests/benchmarks/learning_check.py", *sys.argv[1:]]),
        "commands": commands,
        "base_config": BASE_CONFIG,
        "train_episodes": args.train_episodes,
        "heldout_episodes": args.heldout_episodes,
        "seed": args.seed,
        "steps": {n: steps[n] for n in args.models},
    }
    print_table(results, expert, meta)
    report = {**meta, "expert_follow_original": expert, "results": [asdict(r) for r in results]}
    (work / "learning_check.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {work / 'learning_check.json'}")


if __name__ == "__main__":
    main()
