"""Training jobs for tests, each with a hard deadline after which every process it started is SIGKILLed.

Two kinds:
- `launch(...)`: the real `launchers/train.sh` (prepare, then the deepspeed launcher starts the ranks).
  For tests of the launcher itself: resume, SIGKILL, bad configs.
- `run_ranks(...)`: prepare the run in this process, then start N rank processes directly
  (`python -m vla_scale.train.main`) with the environment a launcher would give them. For tests of the
  engine's behaviour, where the launcher's own start-up is only overhead. The ranks are forked from warm
  interpreters that have already imported torch, transformers and DeepSpeed (tests/train/rank_server.py,
  which says what that does and does not change); VLA_TEST_RANK_SERVER=0 starts fresh interpreters instead.

Every process runs in its own session (process group); on the deadline, or as soon as one rank fails,
every group is killed, waited for, and the test fails with the rank logs. Ranks also get a short
torch.distributed timeout, so a rank whose peer died fails on its own instead of waiting 30 minutes.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from tests.train.rank_server import servers_for

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs/debug.yaml"
FINETUNE = ROOT / "configs/finetune.yaml"
# configs/finetune.yaml shrunk to a CPU smoke test: the tiny random-weight LLaVA instead of SmolVLM, fp32, 2 steps,
# window and chunk short enough for the toy LeRobot episodes (5-7 frames).
FINETUNE_SMOKE = (
    "data.window_size=2",
    "data.fwd_pred_next_n=2",
    "data.num_workers=1",
    "data.shuffle_buffer=16",
    "data.max_text_len=32",
    "train.bf16=false",
    "train.max_steps=2",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_every=1",
    "train.ckpt_every=2",
    "optim.warmup_steps=0",
    "wandb.mode=disabled",
)
PG_TIMEOUT_S = 120  # torch.distributed timeout in run_ranks jobs: a lost peer fails the job within this
GRACE_S = 20.0  # after one rank fails on purpose (expect_fail), how long the others get to fail too


def free_port() -> int:
    """A TCP port nobody listens on right now, outside the kernel's ephemeral range.

    A port from `bind(0)` is an ephemeral one: until a rank binds it, any outgoing connection may be
    given it as its source port, and a client connecting to it on loopback before the server listens
    can even connect to itself. Ports below the ephemeral range are only ever taken by explicit binds.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    if low > 20000:
        rng = random.SystemRandom()
        for _ in range(100):
            port = rng.randrange(10000, low)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket() as s:  # not Linux, or an unusual range: let the kernel pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def finetune_smoke(work: Path, dataset: Path, gradient_checkpointing: bool | None = None) -> list[str]:
    """Overrides that train configs/finetune.yaml on `dataset` as FINETUNE_SMOKE, with the tiny LLaVA built in
    `work`/backbone; `gradient_checkpointing` None leaves the key out of the backbone mapping."""
    checkpointing = ""
    if gradient_checkpointing is not None:
        checkpointing = f"gradient_checkpointing: {str(gradient_checkpointing).lower()}, "
    tiny = (
        "{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64, vision_hidden_size: 32, "
        "vision_layers: 1, vision_heads: 2, image_size: 32, patch_size: 8}"
    )
    backbone = f"{{family: llava, pretrained: {work / 'backbone'}, {checkpointing}tiny: {tiny}}}"
    return [f"data.sources.0.path={dataset}", f"model.backbone={backbone}", *FINETUNE_SMOKE]


def debug_overrides(tmp_path: Path, data: Path, *extra: str) -> list[str]:
    """configs/debug.yaml on the toy data, writing runs under `tmp_path`, with the session's tiny backbone
    (`tiny_backbone`), and wandb off unless `extra` turns it on (`wandb.mode=offline`): its offline run costs
    rank 0 about a second of start-up and shutdown per job, and only the jobs that check wandb's output need it
    (tests/train/test_launcher_integration.py; tests/train/test_metrics.py drives it directly)."""
    return [
        f"run.output_dir={tmp_path / 'runs'}",
        f"data.sources.0.path={data / 'robot'}",
        f"data.sources.1.path={data / 'vl'}",
        f"model.backbone.pretrained={tiny_backbone(tmp_path, data, *extra)}",
        "wandb.mode=disabled",
        *extra,
    ]


def tiny_backbone(tmp_path: Path, data: Path, *extra: str) -> Path:
    """Where the debug run's tiny backbone is: one folder beside the session's data for every job that keeps
    configs/debug.yaml's backbone and seed (the first prepare writes it, atomically; a job started meanwhile
    writes the identical folder and discards it), else `tmp_path`/backbone. Why shared: writing it costs each
    job's prepare ~5 s (importing torch and transformers) before its ranks start."""
    own = any(e.startswith(("model.backbone", "run.seed=")) for e in extra)
    return tmp_path / "backbone" if own else data.parent / "backbones" / "tiny-llava-debug"


def rank_logs(tmp_path: Path, tail: int | None = 6000) -> str:
    """Every rank log under `tmp_path/rank_logs` (either job kind): the last `tail` characters of each (for
    failure messages), or all of it with `tail=None` (for tests that parse the logs)."""
    folder = tmp_path / "rank_logs"
    if not folder.is_dir():
        return "(no rank logs)"
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return "\n".join(f"===== {p.name} =====\n{p.read_text(errors='replace')[-(tail or 0) :]}" for p in files)


def _kill(procs: list[subprocess.Popen]) -> None:
    """SIGKILL every process group and reap them."""
    for proc in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def launcher_command(tmp_path: Path, data: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
    """launchers/train.sh on configs/debug.yaml with the toy data, and its environment (2 CPU ranks, logs per rank)."""
    env = dict(os.environ, PYTHON=sys.executable, RANK_LOG_DIR=str(tmp_path / "rank_logs"), CPU_RANKS="2")
    env["WANDB_MODE"] = "offline"
    # One thread per rank, as in run_ranks and the session's reference run (tests/train/conftest.py): the
    # same float arithmetic everywhere, so losses compare exactly across jobs and launchers.
    env["OMP_NUM_THREADS"] = "1"
    env.pop("MASTER_PORT", None)
    cmd = [str(ROOT / "launchers/train.sh"), str(CONFIG), *debug_overrides(tmp_path, data, *overrides)]
    return cmd, env


def start_launcher(tmp_path: Path, data: Path, *overrides: str, env_extra=None) -> subprocess.Popen:
    """launchers/train.sh in its own session, output appended to tmp_path/launcher.log (for kill tests)."""
    cmd, env = launcher_command(tmp_path, data, *overrides)
    env.update(env_extra or {})
    log = open(tmp_path / "launcher.log", "a")  # noqa: SIM115 (the child holds it; closed when we return)
    try:
        return subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    finally:
        log.close()


def launch(
    tmp_path: Path, data: Path, *overrides: str, timeout: int = 420, expect_fail: bool = False, env_extra=None
) -> subprocess.CompletedProcess:
    """Run launchers/train.sh to the end; on the deadline or an unexpected exit code fail with every rank's log."""
    cmd, env = launcher_command(tmp_path, data, *overrides)
    env.update(env_extra or {})
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill([proc])
        out, err = proc.communicate()
        pytest.fail(f"launcher timed out after {timeout}s\n{out}\n{err}\n{rank_logs(tmp_path)}")
    finally:
        _kill([proc])  # the launcher exited; anything it left behind in its group goes too
    if (proc.returncode != 0) != expect_fail:
        pytest.fail(f"launcher exited {proc.returncode}\n{out}\n{err}\n{rank_logs(tmp_path)}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@dataclass
class RanksResult:
    """What a `run_ranks` job left: each rank's exit code, its logs, and the run directory."""

    returncodes: list[int]
    logs: str
    run_dir: Path


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The environment a launcher gives one rank on this machine (no cluster settings inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MASTER_", "NODE_RANK", "NUM_NODES"))}
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    return env


def run_ranks(
    tmp_path: Path,
    data: Path | None,
    *overrides: str,
    world_size: int = 2,
    timeout: float = 420,
    expect_fail: bool = False,
    config: Path = CONFIG,
    during=None,
) -> RanksResult:
    """Prepare configs/debug.yaml (+ overrides) here, then run `world_size` ranks directly until all exit.

    Another `config` gets only the run folder under `tmp_path` and the short process-group timeout;
    its data paths (and `data` is then unused) and everything else come with `overrides`.
    Fails the test (after killing every rank) on the deadline, when a rank fails unexpectedly, or when
    `expect_fail` and no rank failed. `during(procs)`, if given, is called every poll round while ranks run
    (each proc has `.pid`: tests send it signals).
    """
    from vla_scale.train.prepare import prepare_run

    timeout_override = f"train.process_group_timeout_s={PG_TIMEOUT_S}"
    if config == CONFIG:
        args = debug_overrides(tmp_path, data, timeout_override, *overrides)
    else:
        args = [f"run.output_dir={tmp_path / 'runs'}", timeout_override, *overrides]
    run_dir = prepare_run(config, args, world_size)
    codes = run_module_ranks(
        tmp_path, "vla_scale.train.main", ["--run_dir", str(run_dir)], world_size, timeout, expect_fail, during=during
    )
    return RanksResult(codes, rank_logs(tmp_path), run_dir)


def run_module_ranks(
    tmp_path: Path,
    module: str,
    argv: list[str],
    world_size: int = 2,
    timeout: float = 420,
    expect_fail: bool = False,
    cwd: Path | None = None,
    during=None,  # noqa: ANN001 - Callable[[list[subprocess.Popen]], None]
) -> list[int]:
    """Run `python -m module *argv` as `world_size` ranks (environment, warm servers, deadline and kill rules as
    in `run_ranks`, logs under `tmp_path/rank_logs`) in `cwd` (default `tmp_path`) until all exit; returns their
    exit codes.

    For rank scripts of tests that drive the training code themselves (e.g. tests/train/heads_rank.py, started
    with `cwd=ROOT` so that `python -m tests.train...` finds it whether or not the repo is on PYTHONPATH).
    """
    cwd = cwd or tmp_path
    logs = tmp_path / "rank_logs"
    logs.mkdir(exist_ok=True)
    port = free_port()
    envs = [rank_env(rank, world_size, port) for rank in range(world_size)]
    servers = servers_for(envs)  # warm interpreters to fork the ranks from (tests/train/rank_server.py)
    procs = []
    try:
        for rank in range(world_size):
            log_path = logs / f"rank{rank}.log"
            if servers is not None:
                procs.append(servers[rank].start(module, argv, envs[rank], cwd, log_path))
                continue
            with open(log_path, "a") as log:
                procs.append(
                    subprocess.Popen(
                        [sys.executable, "-m", module, *argv],
                        cwd=cwd,
                        env=envs[rank],
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        deadline = time.monotonic() + timeout
        failed_at = None
        # poll() every rank each round: `any(p.poll() is None ...)` would stop at the first live rank and
        # never notice that a later one already failed (its peer then waits for it until the deadline).
        while None in [p.poll() for p in procs]:
            now = time.monotonic()
            if now > deadline:
                _kill(procs)
                pytest.fail(f"ranks did not finish in {timeout}s\n{rank_logs(tmp_path)}")
            if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
                failed_at = now
                if not expect_fail:
                    break
            if failed_at is not None and now - failed_at > GRACE_S:
                break
            if during is not None:
                during(procs)
            time.sleep(0.2)
    finally:
        _kill(procs)
    codes = [p.returncode for p in procs]
    if any(c != 0 for c in codes) != expect_fail:
        pytest.fail(f"rank exit codes {codes} (expect_fail={expect_fail})\n{rank_logs(tmp_path)}")
    return codes
