"""Setup and resume: everything a rank builds before its first step, restored from `latest` when there is one.

Order matters and is written out once here: load the prepared config, start the process group,
ask `check_same_run` whether this job may join the run directory, seed, build the model (under
ZeRO-3 partitioned at creation), enter the checkpoint's stage (its optimizer state has that
stage's shape), restore engine + RNG + data position, then build the data stream from there.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from vla_scale.compat import keep_hf_deepspeed_config, optimizer_hyperparameters
from vla_scale.config import Config, ConfigError, config_hash, load_config
from vla_scale.data import StreamSpec, StreamTracker, build_dataloader
from vla_scale.data.elastic import rank_virtual_readers
from vla_scale.data.format import Manifest
from vla_scale.data.spaces import Spaces
from vla_scale.model import build_model
from vla_scale.train import checkpoint, universal
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.engine import StagedEngine, init_distributed
from vla_scale.train.resume_check import check_same_run
from vla_scale.train.stages import resolve_stages


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights before DeepSpeed takes over."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run_dataloader(cfg: Config, rank: int, world: int, tokenizer: Any, resume: dict | None = None) -> DataLoader:
    """This rank's loader with the run's seed and micro batch: the one place (loop and benchmarks) that maps a
    run config onto `build_dataloader`, so a benchmark sees the batches `train()` sees."""
    t = cfg.train
    spec = StreamSpec(
        seed=cfg.run.seed,
        rank=rank,
        world_size=world,
        micro_batch_size=t.micro_batch_size,
        global_batch_size=t.global_batch_size,
    )
    return build_dataloader(cfg.data, spec, tokenizer, resume=resume)


def robot_dims(cfg: Config) -> tuple[int, int]:
    """(action_dim, state_dim) of the first robot dataset; prepare checked that every robot dataset agrees."""
    spaces = robot_spaces(cfg)
    return spaces.action.dim, spaces.state.dim


def robot_spaces(cfg: Config) -> Spaces:
    """The declared action/state spaces of the first robot dataset; prepare checked that every robot dataset
    agrees. `build_model(cfg.model, **robot_spaces(cfg).model_dims(), ...)` builds the matching model."""
    for src in cfg.data.sources:
        m = Manifest.load(src.path)
        if m.kind == "robot":
            return m.robot_spaces
    raise ConfigError("data.sources: no robot dataset")


def rng_state() -> dict:
    """Torch RNG state (CPU, and CUDA when present) for the checkpoint: dropout draws continue exactly."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def gathered_data_state(state: dict) -> dict:
    """Collective (`data.elastic`): skip counts and bad windows are kept per virtual reader on the rank that
    serves it; the checkpoint needs all of them, since a resume on other ranks deals the readers out anew."""
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (state["skipped"], state["bad_windows"]))
    merged = dict(state, skipped={}, bad_windows={})
    for skipped, bad in parts:
        merged["skipped"].update(skipped)
        merged["bad_windows"].update(bad)
    return merged


@dataclass
class RunState:
    """One rank's run after setup: config, process group, model, staged engine, data, and the step reached."""

    run_dir: Path
    cfg: Config
    rank: int
    world: int
    staged: StagedEngine
    step: int
    loader: Any
    stream: StreamTracker
    data_iter: Iterator = field(repr=False)
    hf_ds_config: Any = None  # held for the whole run under ZeRO-3: transformers keeps it only weakly

    @property
    def ckpt_dir(self) -> Path:
        return self.run_dir / "checkpoints"

    def client_state(self) -> dict:
        """What our checkpoint adds to DeepSpeed's: step, stage, world size, data position and RNG."""
        return {
            "step": self.step,
            "stage": self.staged.stage.index,
            "config_hash": config_hash(self.cfg),
            "world_size": self.world,
            "data": gathered_data_state(self.stream.state_dict())
            if self.cfg.data.elastic
            else self.stream.state_dict(),
            "rng": rng_state(),
        }

    def save(self) -> None:
        """Collective: checkpoint the current step."""
        t = self.cfg.train
        checkpoint.save(
            self.staged.engine, self.ckpt_dir, self.step, self.client_state(), t.keep_last, self.cfg.debug.save_pause_s
        )


def resume(staged: StagedEngine, ckpt_dir: Path, rank: int, load_dir: Path | None = None) -> tuple[int, dict | None]:
    """Enter the checkpoint's stage (or the first) and restore engine and RNG; returns (step, data state).
    `load_dir`: the universal conversion of `latest` (another world size under ZeRO 1-3)."""
    meta = checkpoint.read_meta(ckpt_dir)
    staged.enter(staged.stages[meta["stage"]] if meta is not None else staged.stages[0])
    hyperparameters = optimizer_hyperparameters(staged.optimizer) if load_dir else []
    client = checkpoint.load_latest(staged.engine, ckpt_dir, load_dir)
    if client is None:
        return 0, None
    if load_dir is not None:
        tag, zero_stage = checkpoint.read_latest(ckpt_dir), staged.cfg.train.zero_stage
        universal.after_load(staged.engine, staged.model, ckpt_dir, tag, zero_stage, hyperparameters)
    if "rng" in client:
        set_rng_state(client["rng"])
    step = int(client["step"])
    if rank == 0:
        print(f"[vla_scale] resumed from {ckpt_dir / checkpoint.read_latest(ckpt_dir)} at step {step}", flush=True)
    return step, client["data"]


def setup(run_dir: str | Path) -> RunState:
    """Build this rank's run from the run directory `prepare_run` laid out, resuming from `latest` if present."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    rank, world = init_distributed(cfg.train.process_group_timeout_s, cfg.debug.shm_allreduce)
    if cfg.train.fp16 and not torch.cuda.is_available():
        raise ConfigError("train.fp16 needs CUDA GPUs (DeepSpeed has no fp16 on CPU); use train.bf16 on CPU")
    check_same_run(run_dir, cfg, world, prepared=True)
    ds_config = build_ds_config(cfg, world)
    ckpt_dir, load_dir = run_dir / "checkpoints", None
    if universal.needs_universal(checkpoint.read_meta(ckpt_dir), cfg.train.zero_stage, world):
        load_dir = universal.convert(ckpt_dir, checkpoint.read_latest(ckpt_dir), rank)
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
    seed_everything(cfg.run.seed)
    dims = robot_spaces(cfg).model_dims()
    # Under ZeRO-3 the backbone is created partitioned (deepspeed.zero.Init) instead of whole on every rank.
    hf_ds_config = keep_hf_deepspeed_config(ds_config) if cfg.train.zero_stage == 3 else None
    model = build_model(cfg.model, **dims, chunk_size=cfg.data.fwd_pred_next_n)
    if hf_ds_config is not None and rank == 0:
        partitioned = all(hasattr(p, "ds_id") for p in model.adapter.model.parameters())
        print(f"[vla_scale] ZeRO-3: backbone loaded partitioned by deepspeed.zero.Init: {partitioned}", flush=True)
    if cfg.data.elastic:
        universal.mark_convertible(model)  # its ZeRO checkpoints may have to load on another number of ranks
    stages = resolve_stages(model, cfg)  # a stage naming nothing fails here, before training
    staged = StagedEngine(model, cfg, ds_config, stages, rank)
    step, data_state = resume(staged, ckpt_dir, rank, load_dir)
    loader = run_dataloader(cfg, rank, world, model.tokenizer, resume=data_state)
    t = cfg.train
    virtual = t.global_batch_size // t.micro_batch_size if cfg.data.elastic else 0
    readers = rank_virtual_readers(virtual, world, rank) if virtual else None
    stream = StreamTracker(
        cfg.run.seed,
        world,
        cfg.data.num_workers,
        t.micro_batch_size,
        data_state,
        virtual_readers=virtual,
        readers=readers,
    )
    return RunState(run_dir, cfg, rank, world, staged, step, loader, stream, iter(loader), hf_ds_config)
