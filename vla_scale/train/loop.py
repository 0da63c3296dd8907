"""The training loop, written out: fetch, forward, backward, step, log, checkpoint."""

from __future__ import annotations

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
from vla_scale.train.engine import build_engine, init_distributed
from vla_scale.train.metrics import Meters, MetricsWriter


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


def train(run_dir: str | Path) -> None:
    """Train the run laid out by `prepare_run` in `run_dir`; resumes from its `latest` checkpoint."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    rank, world = init_distributed(cfg.train.process_group_timeout_s)
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
    engine, _, scheduler = build_engine(model, cfg, ds_config)

    ckpt_dir = run_dir / "checkpoints"
    client = checkpoint.load_latest(engine, ckpt_dir)
    step = 0 if client is None else int(client["step"])
    if client is not None and rank == 0:
        print(f"[vla_scale] resumed from {ckpt_dir / checkpoint.read_latest(ckpt_dir)} at step {step}", flush=True)

    if client is not None and client.get("world_size") != world:
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} was written by {client.get('world_size')} ranks and this job has {world}; "
            "resume with the same number of ranks (the data stream position is per rank)"
        )
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
    accum = engine.gradient_accumulation_steps()
    pbar = tqdm(total=cfg.train.max_steps, initial=step, disable=rank != 0, file=sys.stdout, dynamic_ncols=True)

    def client_state() -> dict:
        return {"step": step, "config_hash": config_hash(cfg), "world_size": world, "data": stream.state_dict()}

    data_iter = iter(loader)
    window_start, data_wait, samples, tokens = time.perf_counter(), 0.0, 0, 0
    while step < cfg.train.max_steps:
        for _ in range(accum):
            t_fetch = time.perf_counter()
            batch = next(data_iter)
            data_wait += time.perf_counter() - t_fetch
            stream.update(batch)
            out = engine(batch.to(engine.device))
            engine.backward(out["loss"])
            engine.step()
            meters.add({k: v for k, v in out.items() if k != "num_tokens"})
            samples += batch.batch_size
            tokens = tokens + (out["num_tokens"].detach() if "num_tokens" in out else batch.text_mask.sum())
        step += 1
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is not None:
            meters.add({"grad_norm": float(grad_norm)})

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            values = meters.reduce()
            elapsed = time.perf_counter() - window_start
            totals = torch.tensor([samples, float(tokens), data_wait, elapsed], dtype=torch.float64)
            dist.all_reduce(totals)
            values.update(
                lr=scheduler.get_last_lr()[0],
                samples_per_s=totals[0].item() / (totals[3].item() / world),
                tokens_per_s=totals[1].item() / (totals[3].item() / world),
                data_wait_frac=totals[2].item() / max(totals[3].item(), 1e-9),
                skipped_samples=sum(stream.skipped().values()),
                **{f"mix/{name}": share for name, share in stream.mix().items()},
                peak_mem_gb=peak_memory_gb(),
            )
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
