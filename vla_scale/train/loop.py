"""The training loop, written out: fetch, forward, backward, step, log, checkpoint."""

from __future__ import annotations

import gc
import json
import random
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm
from transformers.integrations import HfDeepSpeedConfig

from vla_scale.config import Config, ConfigError, config_hash, load_config, to_dict
from vla_scale.data import StreamTracker, build_dataloader
from vla_scale.data.format import Manifest
from vla_scale.model import build_model
from vla_scale.train import checkpoint
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.engine import build_engine, init_distributed, lr_lambda, set_lr
from vla_scale.train.faults import NanInjector, StepGuard
from vla_scale.train.metrics import Meters, MetricsWriter
from vla_scale.train.stages import Stage, apply_stage, resolve_stages, stage_at


def seed_everything(seed: int) -> None:
    """Same seed on every rank: identical initial weights before DeepSpeed takes over."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def robot_dims(cfg: Config) -> tuple[int, int]:
    for src in cfg.data.sources:
        m = Manifest.load(src.path)
        if m.kind == "robot":
            return m.action_dim, m.state_dim
    raise ConfigError("data.sources: no robot dataset")


def memory_mb() -> float:
    """Memory in use now on this rank: allocated device memory on GPU, resident set size on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def optimizer_state_mb(optimizer: torch.optim.Optimizer) -> float:
    """Bytes of optimizer state (Adam moments) this rank holds."""
    total = 0
    for state in optimizer.state.values():
        total += sum(v.numel() * v.element_size() for v in state.values() if torch.is_tensor(v))
    return total / 2**20


def start_stage(model: torch.nn.Module, stage: Stage, cfg: Config, ds_config: dict) -> tuple:
    """Make `stage`'s parameters trainable and build a fresh engine over them.

    Returns (engine, optimizer, report); the report is completed and printed by `report_stage`
    after the stage's first step, when the optimizer state has been allocated.
    """
    before = memory_mb()
    trainable = apply_stage(model, stage)
    engine, optimizer = build_engine(model, cfg, ds_config)
    return engine, optimizer, {"stage": stage.index, "trainable_params": trainable, "mem_before_switch_mb": before}


def report_stage(report: dict, optimizer: torch.optim.Optimizer, rank: int, step: int) -> dict:
    """Per-rank memory once the stage has stepped: optimizer state held here and memory in use."""
    report.update(optim_state_mb=optimizer_state_mb(optimizer), mem_after_switch_mb=memory_mb())
    print(f"[vla_scale] rank {rank} stage {report['stage']} after step {step}: {json.dumps(report)}", flush=True)
    return report


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def train(run_dir: str | Path) -> None:
    """Train the run laid out by `prepare_run` in `run_dir`; resumes from its `latest` checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    rank, world = init_distributed(cfg.train.process_group_timeout_s)
    if cfg.train.fp16 and not torch.cuda.is_available():
        raise ConfigError("train.fp16 needs CUDA GPUs (DeepSpeed has no fp16 on CPU); use train.bf16 on CPU")
    saved_ds = json.loads((run_dir / "ds_config.json").read_text())
    ds_config = build_ds_config(cfg, world)
    if saved_ds != ds_config:
        raise ConfigError(
            f"{run_dir}/ds_config.json was prepared for another world size than the {world} ranks started; "
            "start the run through launchers/train.sh so prepare and launch agree"
        )
    seed_everything(cfg.run.seed)
    action_dim, state_dim = robot_dims(cfg)
    # Under ZeRO-3, transformers' DeepSpeed integration must be alive while from_pretrained runs, so the
    # backbone is created partitioned (deepspeed.zero.Init) instead of whole on every rank. Keep the
    # reference for the whole run: transformers holds it only weakly.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.train.zero_stage == 3 else None
    model = build_model(cfg.model, action_dim=action_dim, state_dim=state_dim, chunk_size=cfg.data.fwd_pred_next_n)
    if hf_ds_config is not None and rank == 0:
        partitioned = all(hasattr(p, "ds_id") for p in model.adapter.model.parameters())
        print(f"[vla_scale] ZeRO-3: backbone loaded partitioned by deepspeed.zero.Init: {partitioned}", flush=True)
    stages = resolve_stages(model, cfg)  # a stage naming nothing fails here, before training

    ckpt_dir = run_dir / "checkpoints"
    meta = checkpoint.read_meta(ckpt_dir)
    if meta is not None and meta.get("world_size") not in (None, world):
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} was written by {meta['world_size']} ranks and this job has {world}; "
            "resume with the same number of ranks (the data stream position is per rank)"
        )
    # The checkpoint's optimizer state has the shape of the stage it was written in: rebuild that stage first.
    if meta is not None and meta["stage"] >= len(stages):
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} was written in stage {meta['stage']} but train.stages now lists "
            f"{len(stages)}; restore the stage list the run was started with"
        )
    stage = stages[meta["stage"]] if meta is not None else stages[0]
    engine, optimizer, stage_report = start_stage(model, stage, cfg, ds_config)
    client = checkpoint.load_latest(engine, ckpt_dir)
    step = 0 if client is None else int(client["step"])
    if client is not None:
        if "rng" in client:
            set_rng_state(client["rng"])
        if rank == 0:
            print(f"[vla_scale] resumed from {ckpt_dir / checkpoint.read_latest(ckpt_dir)} at step {step}", flush=True)

    data_state = None if client is None else client["data"]
    loader = build_dataloader(
        cfg.data,
        seed=cfg.run.seed,
        rank=rank,
        world_size=world,
        tokenizer=model.tokenizer,
        micro_batch_size=cfg.train.micro_batch_size,
        resume=data_state,
    )
    writer = MetricsWriter(run_dir, cfg.run.name, cfg.wandb, to_dict(cfg), start_step=step)
    meters = Meters()
    stream = StreamTracker(cfg.run.seed, world, cfg.data.num_workers, cfg.train.micro_batch_size, data_state)
    guard = StepGuard(cfg.train.max_bad_steps, fp16=cfg.train.fp16)
    inject = NanInjector(rank)
    schedule = lr_lambda(cfg.optim, cfg.train.max_steps)
    accum = engine.gradient_accumulation_steps()
    pbar = tqdm(total=cfg.train.max_steps, initial=step, disable=rank != 0, file=sys.stdout, dynamic_ncols=True)

    def client_state() -> dict:
        return {
            "step": step,
            "stage": stage.index,
            "config_hash": config_hash(cfg),
            "world_size": world,
            "data": stream.state_dict(),
            "rng": rng_state(),
        }

    data_iter = iter(loader)
    window_start, data_wait, samples, tokens = time.perf_counter(), 0.0, 0, 0
    while step < cfg.train.max_steps:
        wanted = stage_at(stages, step)
        if wanted.index != stage.index:
            engine.destroy()
            # destroy() leaves the engine's forward hooks on the model, which keep the old engine (its
            # optimizer state, masters and gradient buffers) alive: remove them so it can be freed.
            engine.module_forward_pre_hook.remove()
            engine.module_forward_post_hook.remove()
            del engine, optimizer
            gc.collect()
            stage = wanted
            engine, optimizer, stage_report = start_stage(model, stage, cfg, ds_config)
        lr = cfg.optim.lr * stage.lr_scale * schedule(step)
        set_lr(optimizer, lr)
        skipped_before = engine.skipped_steps
        if hasattr(optimizer, "overflow"):
            optimizer.overflow = False  # GuardedAdamW's verdict, set again only if its step runs
        outs = []
        for _ in range(accum):
            t_fetch = time.perf_counter()
            batch = next(data_iter)
            data_wait += time.perf_counter() - t_fetch
            stream.update(batch)
            out = inject(step + 1, engine(batch.to(engine.device)))
            engine.backward(out["loss"])
            engine.step()
            outs.append({k: v.detach() for k, v in out.items() if k != "num_tokens"})
            samples += batch.batch_size
            tokens = tokens + (out["num_tokens"].detach() if "num_tokens" in out else batch.text_mask.sum())
        step += 1
        if stage_report is not None:
            meters.add({k: v for k, v in report_stage(stage_report, optimizer, rank, step).items() if k != "stage"})
            stage_report = None
        skipped = engine.skipped_steps > skipped_before or bool(getattr(optimizer, "overflow", False))
        if not guard.after_step(step, skipped, outs):
            for out in outs:
                meters.add(out)
            grad_norm = engine.get_global_grad_norm()
            if grad_norm is not None:
                meters.add({"grad_norm": float(grad_norm)})

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            values = meters.reduce()
            elapsed = time.perf_counter() - window_start
            totals = torch.tensor([samples, float(tokens), data_wait, elapsed], dtype=torch.float64)
            dist.all_reduce(totals)
            values.update(
                lr=lr,
                stage=stage.index,
                samples_per_s=totals[0].item() / (totals[3].item() / world),
                tokens_per_s=totals[1].item() / (totals[3].item() / world),
                data_wait_frac=totals[2].item() / max(totals[3].item(), 1e-9),
                skipped_samples=sum(stream.skipped().values()),
                skipped_steps=guard.skipped_total,
                **{f"mix/{name}": share for name, share in stream.mix().items()},
                peak_mem_gb=peak_memory_gb(),
            )
            if cfg.train.fp16:
                values["loss_scale"] = float(engine.optimizer.cur_scale)
            writer.write(step, values)
            pbar.set_postfix({k: f"{values[k]:.4f}" for k in ("loss", "loss_arm", "loss_vl") if k in values})
            window_start, data_wait, samples, tokens = time.perf_counter(), 0.0, 0, 0
        pbar.update(1)

        if cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0 and step < cfg.train.max_steps:
            checkpoint.save(engine, ckpt_dir, step, client_state(), cfg.train.keep_last)

    if checkpoint.read_latest(ckpt_dir) != checkpoint.tag_for(step):
        checkpoint.save(engine, ckpt_dir, step, client_state(), cfg.train.keep_last)
    pbar.close()
    writer.close()
    del hf_ds_config
    if rank == 0:
        print(f"[vla_scale] done: {step} steps, run directory {run_dir}", flush=True)
    dist.barrier()
