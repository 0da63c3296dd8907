"""`python -m data_tools collect SUITE OUT`: scripted-expert demonstrations from a simulator suite → shards.

Why: closed-loop evaluation needs a policy trained on the same simulator; this writes its
demonstrations in exactly the format the converters write (through `convert.common.convert`
and `ShardWriter`: same samples, manifest, stats.json, `--resume`), so `verify`, `stats`
and training read them like any other dataset. Episode (task, e) uses the seed
`collect_seed(task_index, e)`, a range disjoint from the evaluation seeds, and is a pure
function of it, so the shards are byte-identical for any `--workers`. Episodes the expert
fails are left out and counted in the manifest.

`--grounding N` also writes a vision-language set (OUT/vl) for suites whose tasks share one
scene: the first frame of N of the collected scenes with questions "where is the <colour>
block?" answered by the block's cell in a 3 x 3 grid of the image ("top left", "the centre"),
as LLaVA-style conversations for VL co-training.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from data_tools.convert.common import ConvertOptions, SkipSample, convert, report
from vla_scale.data.format import Episode, Manifest, VLSample
from vla_scale.data.spaces import Space, Spaces

STATIC, WRIST = "rgb_static", "rgb_wrist"
# Both suites act with [dx, dy, dz, gripper] deltas and observe [x, y, z, gripper]; the gripper is declared a
# binary command at 0.5 in both arrays, the layout every policy trained on these suites has used.
SPACES = Spaces(
    Space(4, (3,), 0.5, names=("dx", "dy", "dz", "gripper")),
    Space(4, (3,), 0.5, names=("x", "y", "z", "gripper")),
    normalization="mean_std",
    action_mode="relative",
)
GROUNDING_TURNS = 2  # questions per grounding image (distinct colours)
ROWS, COLS = ("top", "middle", "bottom"), ("left", "centre", "right")
_ENVS: dict[tuple, object] = {}  # one env per worker process and settings (MuJoCo models are slow to build)


@dataclass(frozen=True)
class Source:
    """One demonstration to roll out (picklable, sent to a worker)."""

    task: str
    task_index: int  # in the suite's full task list, so a --tasks subset keeps the seeds
    episode: int
    seed: int


def _env(suite: str, image_size: int, wrist: bool):  # noqa: ANN202 - an Env
    from vla_scale.eval.registry import make_env

    key = (suite, image_size, wrist)
    if key not in _ENVS:
        _ENVS[key] = make_env(suite, image_size=image_size, **({"wrist": True} if wrist else {}))
    return _ENVS[key]


def rollout(src: Source, suite: str, image_size: int, wrist: bool = False, action_noise: float = 0.0) -> Episode:
    """The expert's episode for `src`: frame, state and the expert's action per step, until success.

    With `action_noise` > 0 (DART, Laskey et al. 2017) the executed action is the expert's plus Gaussian noise
    of that standard deviation (a fraction of the [-1, 1] action range), while the recorded label stays the
    expert's action at the state reached: the demonstrations then also show how to recover from the small
    errors a learned policy makes, instead of only the expert's own narrow path (a policy trained on clean
    demonstrations drifts off it, e.g. descends to the table beside the block, and stalls where no
    demonstration ever was). Noise draws depend on the episode's seed only.
    """
    env = _env(suite, image_size, wrist)
    obs = env.reset(src.task, src.seed)
    rng = np.random.default_rng([src.seed, 0xDA27])
    images, wrists, states, actions = [], [], [], []
    success = False
    for _ in range(env.max_steps):
        action = env.action_space.clip(env.expert_action()).astype(np.float32)
        images.append(obs.image)
        if obs.wrist_image is not None:
            wrists.append(obs.wrist_image)
        states.append(np.asarray(obs.state, np.float32))
        actions.append(action)
        executed = action
        if action_noise > 0:
            executed = env.action_space.clip(action + rng.normal(0.0, action_noise, size=action.shape))
        result = env.step(executed)
        obs, success = result.observation, bool(result.success)
        if success or result.done:
            break
    if not success:
        raise SkipSample(
            f"{src.task} episode {src.episode} (seed {src.seed}): the expert failed in {len(actions)} steps"
        )
    frames = {STATIC: images, **({WRIST: wrists} if wrists else {})}
    meta = {"suite": suite, "task": src.task, "seed": src.seed, "episode": src.episode, "action_noise": action_noise}
    key = f"{src.task}_{src.episode:06d}".replace(".", "_")
    return Episode(key, obs.instruction, np.stack(actions), np.stack(states), frames, meta)


def grid_cell(row: float, col: float, height: int, width: int) -> str:
    """'top left', ..., 'the centre': the cell of pixel (row, col) in a 3 x 3 grid of the image."""
    r = ROWS[min(max(int(3 * row / height), 0), 2)]
    c = COLS[min(max(int(3 * col / width), 0), 2)]
    return "the centre" if (r, c) == ("middle", "centre") else f"{r} {c}"


def block_pixels(env, height: int, width: int) -> dict[str, tuple[float, float]]:  # noqa: ANN001 - InstructEnv
    """(row, col) of every block centre in the static camera's image, by pinhole projection of its position."""
    from vla_scale.eval.instruct_scene import COLOURS

    cam = env.model.camera(env.camera).id
    pos, rot = env.data.cam_xpos[cam], env.data.cam_xmat[cam].reshape(3, 3)
    focal = (height / 2) / np.tan(np.deg2rad(float(env.model.cam_fovy[cam])) / 2)
    out = {}
    for colour in COLOURS:
        x, y, z = rot.T @ (env.block_pos(colour) - pos)  # camera frame: x right, y up, looking along -z
        out[colour] = (height / 2 + focal * y / z, width / 2 - focal * x / z)
    return out


def grounding_sample(src: Source, suite: str, image_size: int) -> VLSample:
    """The first frame of `src`'s scene and GROUNDING_TURNS "where is the <colour> block?" turns."""
    env = _env(suite, image_size, False)
    if not env.shared_scene or not hasattr(env, "block_pos"):
        raise ValueError(f"suite {suite} has no shared scene of coloured blocks; --grounding works with 'instruct'")
    image = env.reset(src.task, src.seed).image
    cells = {c: grid_cell(*rc, *image.shape[:2]) for c, rc in block_pixels(env, *image.shape[:2]).items()}
    rng = np.random.default_rng([src.seed, 0x6A0])
    conversations = []
    for turn, colour in enumerate(rng.permutation(sorted(cells))[:GROUNDING_TURNS]):
        question = ("<image>\n" if turn == 0 else "") + f"Where is the {colour} block?"
        answer = cells[str(colour)].capitalize() + "."
        conversations += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return VLSample(f"scene_{src.seed:010d}", image, conversations)


def plan_sources(suite_tasks: tuple[str, ...], tasks: list[str], episodes: int, paired: bool = False) -> list[Source]:
    """Episodes 0..N-1 of every task, episode-major, so a --limit or a partial run covers every task.

    `paired` gives episode e of every task the same scene (the seed of task 0, episode e): in a suite whose
    tasks share one scene, each layout is then demonstrated once per instruction, so the image alone cannot
    predict the action and a policy has to read the instruction to fit even its training data."""
    from vla_scale.eval.seeds import collect_seed

    unknown = [t for t in tasks if t not in suite_tasks]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; the suite's tasks are {', '.join(suite_tasks)}")
    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, not {episodes}")
    return [
        Source(task, suite_tasks.index(task), e, collect_seed(0 if paired else suite_tasks.index(task), e))
        for e in range(episodes)
        for task in tasks
    ]


def suite_info(suite: str) -> tuple[tuple[str, ...], bool]:
    """(tasks, shared_scene) of a suite, read in a throwaway process: the collecting parent then holds no
    simulator or OpenGL context when the converter's pool forks its workers."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply_async(_suite_info, (suite,)).get(timeout=300)


def _suite_info(suite: str) -> tuple[tuple[str, ...], bool]:
    from vla_scale.eval.registry import make_env

    env = make_env(suite, image_size=16)
    try:
        return tuple(env.tasks), bool(env.shared_scene)
    finally:
        env.close()


def collect(
    suite: str,
    out: str | Path,
    tasks: list[str] | None = None,
    episodes: int = 10,
    workers: int = 1,
    image_size: int = 64,
    wrist: bool = False,
    grounding: int = 0,
    image_ext: str = "png",
    episodes_per_shard: int | None = 100,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
    paired: bool = False,
    action_noise: float = 0.0,
) -> dict[str, Manifest]:
    """Write OUT/robot (and with `grounding` OUT/vl); returns the manifests by kind."""
    suite_tasks, shared = suite_info(suite)
    tasks = list(tasks or suite_tasks)
    if grounding and not shared:
        raise ValueError(f"--grounding needs a suite whose tasks share one scene; {suite} has none")
    if paired and not shared:
        raise ValueError(f"--paired-scenes needs a suite whose tasks share one scene; {suite} has none")
    if not 0.0 <= action_noise <= 1.0:
        raise ValueError(f"--action-noise is a standard deviation in action units, in [0, 1]; got {action_noise}")
    sources = plan_sources(suite_tasks, tasks, episodes, paired)
    out = Path(out)
    common = {"workers": workers, "episodes_per_shard": episodes_per_shard, "image_ext": image_ext}
    # spawned workers: a forked child of a process that has used EGL (a --workers 1 run before) can hang in it
    common.update(overwrite=overwrite, resume=resume, progress=progress, start_method="spawn")
    settings = {"format": "collect", "suite": suite, "tasks": tasks, "image_size": image_size, "wrist": wrist}
    settings.update(paired=paired, action_noise=action_noise)
    extra = {"suite": suite, "tasks": tasks, "image_size": image_size, "seeds": "vla_scale.eval.seeds.collect_seed"}
    extra.update(paired_scenes=paired, action_noise=action_noise)
    opts = ConvertOptions(src=f"sim/{suite}", out=str(out / "robot"), **common)
    load = partial(rollout, suite=suite, image_size=image_size, wrist=wrist, action_noise=action_noise)
    try:
        manifests = {"robot": convert(sources, load, opts, f"{suite}_expert", settings, extra, spaces=SPACES)}
        if grounding:
            manifests["vl"] = _collect_grounding(suite, suite_tasks, tasks, grounding, out, common, settings)
    finally:
        close_envs()
    return manifests


def close_envs() -> None:
    """Close the envs this process opened (with --workers 1 the rollouts ran here); MuJoCo's EGL context
    raises at interpreter exit otherwise."""
    while _ENVS:
        _ENVS.popitem()[1].close()


def _collect_grounding(
    suite: str, suite_tasks: tuple[str, ...], tasks: list[str], n: int, out: Path, common: dict, settings: dict
) -> Manifest:
    """OUT/vl: the scenes of the demonstrations first (same order), more collection-range scenes beyond them."""
    scenes = plan_sources(suite_tasks, tasks, -(-n // len(tasks)))[:n]
    opts = ConvertOptions(src=f"sim/{suite}", out=str(out / "vl"), **common)
    load = partial(grounding_sample, suite=suite, image_size=settings["image_size"])
    vl_settings = {**settings, "format": "collect_grounding", "turns": GROUNDING_TURNS}
    extra = {"suite": suite, "tasks": tasks, "image_size": settings["image_size"], "turns": GROUNDING_TURNS}
    return convert(scenes, load, opts, f"{suite}_grounding", vl_settings, extra, "vl")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register `python -m data_tools collect`."""
    p = subparsers.add_parser(
        "collect",
        help="roll out a simulator suite's scripted expert into a robot dataset (and a grounding VL set)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("suite", help="simulator suite, e.g. instruct or metaworld")
    p.add_argument("out", metavar="OUT", help="folder that receives robot/ (and vl/ with --grounding)")
    p.add_argument("--tasks", default="", help="comma-separated task names (default: every task of the suite)")
    p.add_argument("--episodes", type=int, default=10, help="demonstrations per task (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="rollout processes (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=64, help="frame height = width in pixels (default: %(default)s)")
    p.add_argument("--wrist", action="store_true", help="also record the wrist camera as rgb_wrist")
    p.add_argument("--grounding", type=int, default=0, metavar="N", help="also write N grounding VL scenes to OUT/vl")
    p.add_argument(
        "--paired-scenes",
        action="store_true",
        help="episode e of every task shares one scene (shared-scene suites): the instruction is then the only cue",
    )
    p.add_argument(
        "--action-noise",
        type=float,
        default=0.0,
        metavar="SIGMA",
        help="execute the expert's action plus Gaussian noise of this std, record the clean action (DART): "
        "demonstrations of recovering from small errors (default: %(default)s)",
    )
    p.add_argument("--episodes-per-shard", type=int, default=100, help="(default: %(default)s)")
    p.add_argument(
        "--image-ext",
        choices=("png", "jpg", "webp"),
        default="png",
        help="png (default) is lossless, so training sees the pixels evaluation renders",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace datasets already in OUT")
    group.add_argument("--resume", action="store_true", help="continue an interrupted collection into OUT")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    manifests = collect(
        args.suite,
        args.out,
        tasks=[t for t in args.tasks.split(",") if t],
        episodes=args.episodes,
        workers=args.workers,
        image_size=args.image_size,
        wrist=args.wrist,
        grounding=args.grounding,
        image_ext=args.image_ext,
        episodes_per_shard=args.episodes_per_shard,
        overwrite=args.overwrite,
        resume=args.resume,
        paired=args.paired_scenes,
        action_noise=args.action_noise,
    )
    for kind, manifest in manifests.items():
        report(manifest, str(Path(args.out) / kind))
    return 0
