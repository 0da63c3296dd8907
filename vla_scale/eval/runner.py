"""Closed-loop evaluation: episodes over held-out seeds, in worker processes, into one results dict.

Every episode is a pure function of (task, episode index): its seed comes from
`seeds.eval_seed`, the agent is reset with that seed, and results are sorted by
(task, episode) before they are summarised, so the results are the same for any number
of workers. Workers are spawned processes, each with its own env and agent (simulators
and models are neither fork- nor thread-safe), each in its own process group, and are
killed together when one fails or goes `timeout_s` without finishing an episode.

Timing separates start-up (spawning, imports, building the env, loading the policy: paid
once per worker, whatever the number of episodes) from the episode phase: workers report
ready and wait until all are, so `episodes_per_s` is the rate at which episodes are run and
scales with the worker count, while `wall_s` is what the whole call took.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vla_scale.eval.agents import Agent
from vla_scale.eval.metrics import summarize_episodes
from vla_scale.eval.video import compose_frame, write_video

AgentFactory = Callable[[Any], Agent]  # env -> agent; picklable (module-level function or functools.partial)


class EvalError(RuntimeError):
    """Evaluation could not finish: a worker failed or timed out (the message says which and why)."""


@dataclass
class EvalConfig:
    """What to evaluate and how; JSON-able, copied into results.json."""

    suite: str
    tasks: list[str] = field(default_factory=list)  # empty: every task of the suite
    episodes: int = 10  # per task
    workers: int = 1  # 0: run in this process (no isolation, no timeout)
    exec_steps: int = 1
    ensemble: bool = False
    delay: int | None = None  # simulated inference latency in steps: asynchronous execution (agents.Execution)
    overlap: int | None = None
    rtc: bool = False
    swap_instruction: bool = False
    videos: int = 0  # episodes per task with a video (the first ones)
    video_format: str = "mp4"  # or "gif"
    seed_offset: int = 0  # first episode index, to evaluate another block of held-out seeds
    image_size: int = 64
    out_dir: str | None = None  # results.json and videos/; None writes nothing
    timeout_s: float = 600.0  # a worker that finishes no episode for this long is killed
    agent: str = ""  # what was evaluated (e.g. "policy /path/to/export"), for the reader of results.json
    label: str = ""  # the run's name in `vla-scale eval-report` tables


@dataclass(frozen=True)
class EpisodeJob:
    task: str
    task_index: int  # index in the suite's full task list (seeds do not depend on the --tasks subset)
    episode: int
    seed: int
    named_task: str  # the task whose instruction is shown (== task unless swapping)
    video: str | None  # path to write, or None


def plan_jobs(env_tasks: tuple[str, ...], shared_scene: bool, cfg: EvalConfig) -> list[EpisodeJob]:
    """Every episode to run, episode-major (so partial progress covers every task)."""
    from vla_scale.eval.seeds import eval_seed

    tasks = list(cfg.tasks) or list(env_tasks)
    unknown = [t for t in tasks if t not in env_tasks]
    if unknown:
        raise ValueError(f"suite {cfg.suite} has no task(s) {unknown}; its tasks are {', '.join(env_tasks)}")
    if cfg.episodes < 1:
        raise ValueError(f"episodes must be >= 1, not {cfg.episodes}")
    if cfg.swap_instruction:
        if not shared_scene:
            raise ValueError(
                f"--swap-instruction needs a suite whose tasks share one scene; in suite {cfg.suite} each task "
                "has its own scene, so another task's instruction cannot be carried out there"
            )
        if len(tasks) < 2:
            raise ValueError("--swap-instruction needs at least 2 tasks to swap instructions between")
    jobs = []
    for e in range(cfg.seed_offset, cfg.seed_offset + cfg.episodes):
        for i, task in enumerate(tasks):
            named = task
            if cfg.swap_instruction:  # a cyclic shift by 1..n-1: a derangement that pairs every task with every other
                named = tasks[(i + 1 + (e % (len(tasks) - 1))) % len(tasks)]
            video = None
            if cfg.out_dir and e - cfg.seed_offset < cfg.videos:
                name = f"{task}_ep{e:04d}" + (f"_told_{named}" if named != task else "")
                video = str(Path(cfg.out_dir) / "videos" / f"{name}.{cfg.video_format}")
            ti = env_tasks.index(task)
            jobs.append(EpisodeJob(task, ti, e, eval_seed(ti, e), named, video))
    return jobs


def run_episode(env: Any, agent: Agent, job: EpisodeJob) -> dict:
    """One episode; with a swapped instruction, the scene of `job.task` and the instruction of `job.named_task`.

    The env is reset to the named task in the seed's scene (shared-scene suites lay out a scene from the
    seed alone), so its own success flag is the named task's; the original task is scored with
    `env.success`. The episode stops at the first success of either, at `done`, or after `max_steps`.
    """
    env.observe_images = agent.needs_images or job.video is not None
    obs = env.reset(job.named_task, job.seed)
    agent.reset(env, job.seed)
    swap = job.named_task != job.task
    frames = [compose_frame(obs.image, obs.wrist_image)] if job.video else []
    success = original = False
    steps = 0
    for steps in range(1, env.max_steps + 1):  # noqa: B007 - the count is the episode length
        result = env.step(agent.act(obs))
        obs = result.observation
        if job.video:
            frames.append(compose_frame(obs.image, obs.wrist_image))
        success = success or bool(result.success)
        original = swap and (original or bool(env.success(job.task)))
        if success or original or result.done:
            break
    record = {
        "task": job.task,
        "episode": job.episode,
        "seed": job.seed,
        "instruction": obs.instruction,
        "success": success,
        "length": steps,
    }
    if swap:
        record.update(named_task=job.named_task, followed=success, original=original)
    record.update(agent.episode_info())
    if job.video:
        record["video"] = str(write_video(frames, job.video))
    return record


def _worker(rank: int, factory: AgentFactory, cfg: EvalConfig, jobs: mp.Queue, results: mp.Queue, start: Any) -> None:
    """Worker process: own process group (so a kill reaches anything it starts), own env and agent.

    Reports ("ready", rank, None) once its env and agent are built, then waits for `start` (set when
    every worker is ready) before taking episodes; gives up if the parent goes away meanwhile.
    """
    parent = os.getppid()
    os.setsid()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one thread each (read when torch is first imported):
        os.environ[var] = "1"  # W workers on W cores, no oversubscription
    env = agent = None
    try:
        from vla_scale.eval.registry import make_env

        env = make_env(cfg.suite, image_size=cfg.image_size)
        agent = factory(env)
        if "torch" in sys.modules:  # imported before the variables were set (e.g. by the caller's main module)
            sys.modules["torch"].set_num_threads(1)
        results.put(("ready", rank, None))
        while not start.wait(timeout=1.0):
            if os.getppid() != parent:
                return
        while (job := jobs.get()) is not None:
            results.put(("ok", rank, run_episode(env, agent, job)))
    except BaseException:  # noqa: BLE001 - everything goes back to the parent, which kills the rest
        results.put(("error", rank, traceback.format_exc()))
    finally:
        for thing in (agent, env):
            if thing is not None:
                thing.close()


def _kill(procs: list[mp.process.BaseProcess]) -> None:
    for p in procs:
        if p.pid is not None and p.exitcode is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                p.kill()
    for p in procs:
        if p.pid is not None:
            p.join(timeout=10)


def _check_workers(
    procs: list[mp.process.BaseProcess], last: list[float], timeout_s: float, drained: int, missing: int
) -> int:
    """Raise if a worker died or timed out; returns the count of empty polls after every worker exited."""
    now = time.monotonic()
    for r, p in enumerate(procs):
        if p.exitcode not in (None, 0):
            raise EvalError(f"eval worker {r} died (exit code {p.exitcode}) without a report")
        if p.exitcode is None and now - last[r] > timeout_s:
            raise EvalError(f"eval worker {r} finished no episode in {timeout_s:.0f} s; killed")
    if all(p.exitcode == 0 for p in procs):
        drained += 1  # results written just before the exit may still be in the pipe
        if drained > 4:
            raise EvalError(f"eval workers exited with {missing} episodes unreported")
    return drained


def _run_workers(
    factory: AgentFactory, cfg: EvalConfig, jobs: list[EpisodeJob], progress: bool
) -> tuple[list[dict], float]:
    """The episodes' records and the start-up time (until every worker had its env and agent built)."""
    ctx = mp.get_context("spawn")
    job_q, result_q, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    for job in jobs:
        job_q.put(job)
    n = min(cfg.workers, len(jobs))
    for _ in range(n):
        job_q.put(None)
    procs = [ctx.Process(target=_worker, args=(r, factory, cfg, job_q, result_q, start), daemon=True) for r in range(n)]
    records: list[dict] = []
    t0 = time.perf_counter()
    startup = float("nan")
    try:
        for p in procs:
            p.start()
        last = [time.monotonic()] * n  # when each worker last finished an episode (or started)
        drained = 0
        ready = 0
        while len(records) < len(jobs):
            try:
                status, rank, payload = result_q.get(timeout=0.5)
            except queue.Empty:
                drained = _check_workers(procs, last, cfg.timeout_s, drained, len(jobs) - len(records))
                continue
            if status == "error":
                raise EvalError(f"eval worker {rank} failed:\n{payload}")
            last[rank] = time.monotonic()
            if status == "ready":
                ready += 1
                if ready == n:
                    startup = time.perf_counter() - t0
                    start.set()
                continue
            records.append(payload)
            if progress:
                print(f"\r  {len(records)}/{len(jobs)} episodes", end="", flush=True)
    finally:
        if progress and records:
            print()
        _kill(procs)
        job_q.cancel_join_thread()
    return records, startup


def evaluate(agent_factory: AgentFactory, cfg: EvalConfig, progress: bool = False) -> dict:
    """Run every episode of `cfg` with agents from `agent_factory`; returns (and with `out_dir` writes) results."""
    from vla_scale.eval.registry import make_env

    if cfg.video_format not in ("mp4", "gif"):
        raise ValueError(f"video_format must be 'mp4' or 'gif', not {cfg.video_format!r}")
    probe = make_env(cfg.suite, image_size=cfg.image_size)
    try:
        env_tasks, shared, max_steps = tuple(probe.tasks), bool(probe.shared_scene), int(probe.max_steps)
        jobs = plan_jobs(env_tasks, shared, cfg)
        start = time.perf_counter()
        if cfg.workers == 0:
            agent = agent_factory(probe)
            startup = time.perf_counter() - start
            try:
                records = [run_episode(probe, agent, job) for job in jobs]
            finally:
                agent.close()
    finally:
        probe.close()
    if cfg.workers > 0:
        records, startup = _run_workers(agent_factory, cfg, jobs, progress)
    wall = time.perf_counter() - start
    run_s = wall - startup
    records.sort(key=lambda r: (r["task"], r["episode"]))
    tasks = list(dict.fromkeys(j.task for j in jobs))
    results = {
        "suite": cfg.suite,
        "config": asdict(cfg),
        "max_steps": max_steps,
        **summarize_episodes(records, tasks, swap=cfg.swap_instruction),
        "episodes": records,
        "timing": {
            "wall_s": wall,  # the whole call
            "startup_s": startup,  # until every worker had its env and agent
            "episodes_s": run_s,  # the episode phase
            "episodes_per_s": len(records) / run_s if run_s > 0 else float("nan"),
            "episodes_per_s_overall": len(records) / wall if wall > 0 else float("nan"),
        },
    }
    if cfg.out_dir:
        write_results(results, Path(cfg.out_dir) / "results.json")
    return results


def write_results(results: dict, path: str | Path) -> Path:
    """results.json, atomically (a reader never sees half a file)."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_json_default))
    tmp.replace(path)
    return path


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
