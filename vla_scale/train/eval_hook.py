"""Closed-loop evaluation during training (`eval:` config section), in a background process on rank 0.

Why a separate process: a closed-loop evaluation takes minutes of CPU; run inside the loop it
would stall every rank's next collective. Instead, after a checkpoint save at a multiple of
`eval.every_steps`, rank 0 hard-links that checkpoint into `<run_dir>/eval/step_XXXXXXXX/` (so
`train.keep_last` cannot delete it under the evaluator) with the run's config, and starts

    python -m vla_scale.train.eval_hook <run_dir>/eval/step_XXXXXXXX

in its own process group. That job exports the checkpoint (`export_policy`), runs
`vla_scale.eval.runner.evaluate` with the policy and writes `results.json` (and `videos/`) there.
At log steps rank 0 polls it and adds `eval/success/<task>`, `eval/success` (all episodes) and
`eval/step` (the evaluated step) to that step's metrics record. One evaluation runs at a time; a
checkpoint due while one runs waits, and a newer one replaces a waiting one (logged).

Nothing here touches the training RNG or data stream, so exact resume is unchanged. On resume, steps
whose `eval/step` is in metrics.jsonl are not redone; a `results.json` that was never logged is
logged at the next log step; an evaluation the crash interrupted is started again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from vla_scale.config import save_config
from vla_scale.train import checkpoint
from vla_scale.train.log_window import collective_device as _device
from vla_scale.train.metrics import MetricsWriter, read_metrics, wandb_mode

if TYPE_CHECKING:
    from vla_scale.config.schema_eval import PeriodicEvalConfig
    from vla_scale.eval.runner import EvalConfig
    from vla_scale.train.state import RunState

RESULTS = "results.json"
FAILED = "failed.txt"  # written when an evaluation job fails: not retried on resume
LOG = "eval.log"
# Process-group variables of a training rank: the evaluation job is a plain single process.
_RANK_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


def eval_dir(run_dir: Path, step: int) -> Path:
    """`<run_dir>/eval/step_XXXXXXXX`: the checkpoint snapshot, export and results of one evaluated step."""
    return Path(run_dir) / "eval" / checkpoint.tag_for(step)


CHUNK_FIGURES = ("switch_jump", "step_jump", "switch_departure")  # how the policy's chunks joined (eval/metrics.py)


def eval_values(results: dict, step: int) -> dict[str, float]:
    """The metrics of one results.json: `eval/success/<task>`, `eval/success` (all episodes), `eval/step`, and
    the overall chunk figures it has (`eval/switch_jump`, `eval/step_jump`, `eval/switch_departure`)."""
    values = {f"eval/success/{task}": block["success"]["rate"] for task, block in results["tasks"].items()}
    overall = results["overall"]
    values["eval/success"] = overall["success"]["rate"]
    values.update({f"eval/{key}": overall[key] for key in CHUNK_FIGURES if key in overall})
    values["eval/step"] = step
    return values


class EvalHook:
    """Rank 0's background evaluations; on other ranks (or with `eval.suite` empty) every method does nothing."""

    def __init__(self, run: RunState, writer: MetricsWriter) -> None:
        """Call after `writer` exists: it has already dropped metrics.jsonl records past the resumed step."""
        self.run_dir, self.cfg = Path(run.run_dir), run.cfg
        self.ev = run.cfg.eval
        self.writer = writer
        self.active = self.ev.enabled and run.rank == 0
        self.running: tuple[int, subprocess.Popen] | None = None
        self.pending: list[int] = []  # snapshotted steps waiting for the running evaluation
        self.ready: list[int] = []  # steps with results.json, not yet logged
        self.done: set[int] = set()  # steps evaluated (logged or ready) or failed: never started again
        if self.active:
            self._recover(run.step)

    # ----- the three calls of the training loop ---------------------------------------------------
    def after_save(self, step: int) -> None:
        """After a checkpoint save: snapshot it and start (or queue) its evaluation if `step` is due."""
        if self.active and self.ev.every_steps and step % self.ev.every_steps == 0:
            self._submit(step)

    def poll(self, step: int) -> dict[str, float]:
        """At a log step: values of one finished evaluation to add to this step's record ({} if none)."""
        if not self.active:
            return {}
        self._reap()
        if not self.ready:
            return {}
        return self._take(step)

    def finish(self, step: int) -> None:
        """Collective, end of training: evaluate the final checkpoint (`eval.at_end`), wait up to
        `eval.final_wait_s` for what is running or queued, and write every result not logged yet as its
        own record. The other ranks wait with rank 0 in short broadcasts, so a wait longer than
        `train.process_group_timeout_s` does not time out their next collective."""
        if not self.ev.enabled:
            return
        if self.active and (self.ev.at_end or (self.ev.every_steps and step % self.ev.every_steps == 0)):
            self._submit(step)
        deadline = time.monotonic() + self.ev.final_wait_s
        while True:
            if self.active:
                self._reap()
            busy = self.running is not None and time.monotonic() < deadline
            waiting = torch.tensor([int(busy)], dtype=torch.int32, device=_device())
            if dist.is_initialized():
                dist.broadcast(waiting, src=0)
            if not waiting.item():
                break
            time.sleep(1.0)
        if self.running is not None:
            s, proc = self.running
            print(
                f"[vla_scale] eval of step {s} still running after eval.final_wait_s={self.ev.final_wait_s:g}s: "
                f"stopped; starting the run again evaluates it",
                flush=True,
            )
            stop(proc)
            self.running = None
        while self.ready:
            self.writer.write(step, self._take(step))

    def abandon(self) -> None:
        """Preemption: stop a running evaluation without waiting; the resumed run starts it again (`_recover`)."""
        if self.running is not None:
            stop(self.running[1], grace_s=5.0)
            self.running = None

    # ----- bookkeeping ------------------------------------------------------------------------------
    def _recover(self, step: int) -> None:
        """Resume: find logged steps, unlogged results and interrupted evaluations under <run_dir>/eval."""
        root = self.run_dir / "eval"
        logged = set()
        if (self.run_dir / "metrics.jsonl").is_file():
            logged = {int(r["eval/step"]) for r in read_metrics(self.run_dir) if "eval/step" in r}
        self.done |= logged
        if not root.is_dir():
            return
        for path in sorted(root.iterdir()):
            if path.name.startswith("."):  # a snapshot the crash left half made
                shutil.rmtree(path, ignore_errors=True)
                continue
            if not path.name.startswith("step_") or not path.name[5:].isdigit():
                continue
            s = int(path.name[5:])
            if s in logged:
                continue
            if (path / RESULTS).is_file():
                self.ready.append(s)
                self.done.add(s)
            elif (path / FAILED).is_file():
                self.done.add(s)
            elif s <= step and ((path / "checkpoints" / path.name).is_dir() or (path / "policy").is_dir()):
                self.pending.append(s)
            else:
                shutil.rmtree(path, ignore_errors=True)
        if self.ready or self.pending:
            print(f"[vla_scale] eval: results to log {self.ready}, evaluations to redo {self.pending}", flush=True)

    def _submit(self, step: int) -> None:
        if step in self.done or step in self.pending or (self.running and self.running[0] == step):
            return
        self._snapshot(step)
        self._reap()
        if self.running is not None:
            for old in self.pending:
                print(f"[vla_scale] eval: skipping step {old}, step {step} is newer", flush=True)
                shutil.rmtree(eval_dir(self.run_dir, old), ignore_errors=True)
            self.pending = []
            print(f"[vla_scale] eval: step {step} waits for the evaluation of step {self.running[0]}", flush=True)
        self.pending.append(step)
        self._reap()

    def _snapshot(self, step: int) -> None:
        """Hard-link (copy across filesystems) the checkpoint of `step` and write the current config beside it."""
        target = eval_dir(self.run_dir, step)
        shutil.rmtree(target, ignore_errors=True)
        tmp = target.with_name(f".{target.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tag = checkpoint.tag_for(step)
        shutil.copytree(self.run_dir / "checkpoints" / tag, tmp / "checkpoints" / tag, copy_function=_link_or_copy)
        save_config(self.cfg, tmp / "config.yaml")
        tmp.rename(target)

    def _reap(self) -> None:
        """Collect a finished evaluation, then start the next queued one."""
        if self.running is not None and self.running[1].poll() is not None:
            step, proc = self.running
            self.running = None
            self.done.add(step)
            folder = eval_dir(self.run_dir, step)
            if proc.returncode == 0 and (folder / RESULTS).is_file():
                self.ready.append(step)
            else:
                tail = (folder / LOG).read_text(errors="replace")[-2000:] if (folder / LOG).is_file() else ""
                (folder / FAILED).write_text(f"exit code {proc.returncode}\n{tail}")
                shutil.rmtree(folder / "checkpoints", ignore_errors=True)
                if not self.ev.keep_exports:
                    shutil.rmtree(folder / "policy", ignore_errors=True)
                print(f"[vla_scale] eval of step {step} failed (exit code {proc.returncode}):\n{tail}", flush=True)
        if self.running is None and self.pending:
            step = self.pending.pop(0)
            self.running = (step, start_job(eval_dir(self.run_dir, step), self.ev.device))
            print(f"[vla_scale] eval: evaluating step {step} in the background (pid {self.running[1].pid})", flush=True)

    def _take(self, step: int) -> dict[str, float]:
        """Values of the oldest unlogged result; its videos go to wandb (online) at `step`."""
        s = self.ready.pop(0)
        results = json.loads((eval_dir(self.run_dir, s) / RESULTS).read_text())
        values = eval_values(results, s)
        print(f"[vla_scale] eval of step {s}: success {values['eval/success']:.3f}", flush=True)
        wb = self.writer.wandb
        if wb is not None and wandb_mode(self.cfg.wandb) == "online":
            import wandb

            videos = {}
            for ep in results.get("episodes", []):
                if ep.get("video") and Path(ep["video"]).is_file():
                    videos.setdefault(f"eval/video/{ep['task']}", wandb.Video(ep["video"]))
            if videos:
                wb.log(videos, step=step)
        return values


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def start_job(folder: Path, device: str) -> subprocess.Popen:
    """`python -m vla_scale.train.eval_hook FOLDER` in its own process group, output to FOLDER/eval.log."""
    env = {k: v for k, v in os.environ.items() if k not in _RANK_ENV}
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA context on the training GPU
    with open(folder / LOG, "a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "vla_scale.train.eval_hook", str(folder)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the job's process group (it stops its simulator workers), SIGKILL it after `grace_s`."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# ----- the background job ---------------------------------------------------------------------------
def eval_setup(ev: PeriodicEvalConfig, policy: Path, folder: Path, image_size: int) -> tuple[EvalConfig, Callable]:
    """The runner's config and the policy agent factory for the `eval:` section `ev` (export `policy`)."""
    from functools import partial

    from vla_scale.eval.agents import make_agent
    from vla_scale.eval.runner import EvalConfig

    execution = {"delay": ev.delay or None, "overlap": ev.overlap or None, "rtc": ev.rtc}
    ecfg = EvalConfig(
        suite=ev.suite,
        tasks=list(ev.tasks),
        episodes=ev.episodes,
        workers=ev.workers,
        exec_steps=ev.exec_steps,
        ensemble=ev.ensemble,
        **execution,
        videos=ev.videos,
        image_size=image_size,
        out_dir=str(folder),
    )
    factory = partial(
        make_agent,
        kind="policy",
        path=str(policy),
        exec_steps=ev.exec_steps,
        ensemble=ev.ensemble,
        device=ev.device,
        **execution,
    )
    return ecfg, factory


def run_job(folder: str | Path) -> dict:
    """Export the snapshotted checkpoint in `folder` and evaluate it closed loop; returns the results."""
    from vla_scale.config import load_config
    from vla_scale.eval.runner import evaluate
    from vla_scale.train.export import export_policy, robot_manifest

    folder = Path(folder)
    cfg = load_config(folder / "config.yaml")
    ev = cfg.eval
    tag = folder.name
    policy = folder / "policy"  # export_policy renames it into place complete, so a job redone may reuse it
    if (folder / "checkpoints" / tag).is_dir():
        shutil.rmtree(policy, ignore_errors=True)
        export_policy(folder, policy, tag=tag)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the export holds what evaluation needs
    image_size = ev.image_size or robot_manifest(cfg)[1].image_size[0]
    ecfg, agent = eval_setup(ev, policy, folder, image_size)
    results = evaluate(agent, ecfg)
    if not ev.keep_exports:
        shutil.rmtree(policy, ignore_errors=True)
    return results


def _exit_with_parent() -> None:
    """Stop this job when the training rank that started it dies (a crash or a SIGKILLed job)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through evaluate(), which kills its workers


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m vla_scale.train.eval_hook <run_dir>/eval/step_XXXXXXXX", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    _exit_with_parent()
    results = run_job(args[0])
    print(f"[vla_scale] eval {args[0]}: success {results['overall']['success']['rate']:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
