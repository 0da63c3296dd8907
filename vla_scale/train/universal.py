"""Resuming a ZeRO 1-3 checkpoint on another number of ranks, through DeepSpeed's universal checkpoints.

Why: under ZeRO 1-3 every rank saves only its partition of the fp32 master weights and Adam moments, laid
out for the world size that wrote them. DeepSpeed's `ds_to_universal` rewrites a checkpoint as one file
per parameter (fp32 weight, exp_avg, exp_avg_sq), and an engine configured with
`checkpoint.load_universal` loads that into its own partitioning. Nothing is recomputed, so masters and
moments carry over exactly.

Rank 0 converts `checkpoints/<tag>` into `checkpoints/universal/<tag>` once (in a child process: the
converter forks worker pools, which a rank holding a process group must not do), atomically (a temporary
folder renamed at the end). The other ranks poll for that folder, with no collective pending: a large
checkpoint's conversion may take longer than the process-group timeout (`train.process_group_timeout_s`)
that would bound a barrier. If the conversion fails, rank 0 leaves `universal/.<tag>.failed` with the
reason, and every rank stops with it.

A universal load restores only what the optimizer holds (DeepSpeed skips the module file), so
`after_load` copies the checkpoint's values into the parameters the current stage freezes (an
earlier stage may have trained them), and under ZeRO-3 repairs what DeepSpeed's loader gets wrong
(`compat.repair_zero3_universal_load`).

A conversion is needed only while its tag is being loaded: `prune` keeps at most that one (at
conversion time), and every new checkpoint removes them all (`checkpoint.save`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch.distributed as dist

UNIVERSAL = "universal"


def mark_convertible(model) -> None:
    """Let `ds_to_universal` convert this model's checkpoints: DeepSpeed saves the `universal_checkpoint_info`
    attribute of the module it wraps (Megatron sets it; a plain model has no tensor-parallel patterns to declare)."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    setattr(model, UNIVERSAL_CHECKPOINT_INFO, {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE})


def needs_universal(meta: dict | None, zero_stage: int, world_size: int) -> bool:
    """True when `latest` was written by another number of ranks and its optimizer state is partitioned."""
    return meta is not None and meta.get("world_size") not in (None, world_size) and zero_stage > 0


def convert(ckpt_dir: Path, tag: str, rank: int, poll_s: float = 2.0) -> Path:
    """Rank 0 writes `<ckpt_dir>/universal/<tag>` unless it exists, the others wait; returns `<ckpt_dir>/universal`.

    Called by every rank. The one barrier comes before the conversion (all ranks have just joined the
    process group), so that a failure marker from an earlier attempt is gone before anyone looks for one.
    """
    out_dir = ckpt_dir / UNIVERSAL
    target, failed = out_dir / tag, out_dir / f".{tag}.failed"
    if rank == 0 and not target.is_dir():
        prune(ckpt_dir, keep=tag)  # conversions of older tags, left by a resume that never saved
        out_dir.mkdir(exist_ok=True)
        failed.unlink(missing_ok=True)
    if dist.is_initialized():
        dist.barrier()
    if rank == 0 and not target.is_dir():
        try:
            _convert(ckpt_dir, tag, out_dir)
        except Exception as e:
            failed.write_text(f"{e}\n")
            raise
    while not target.is_dir():
        if failed.exists():
            raise RuntimeError(
                f"rank 0 could not convert {ckpt_dir / tag} to a universal checkpoint: {failed.read_text()}"
            )
        time.sleep(poll_s)
    return out_dir


def prune(ckpt_dir: Path, keep: str | None = None) -> list[str]:
    """Remove every entry of `<ckpt_dir>/universal/` but the conversion of `keep` (and its temporary folder and
    failure marker); the folder itself goes when nothing is left. Returns the names removed. Rank 0 only."""
    out_dir = ckpt_dir / UNIVERSAL
    if not out_dir.is_dir():
        return []
    kept = {keep, f".{keep}.tmp", f".{keep}.failed"} if keep else set()
    removed = sorted(p.name for p in out_dir.iterdir() if p.name not in kept)
    for name in removed:
        path = out_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    if not any(out_dir.iterdir()):
        out_dir.rmdir()
    return removed


def after_load(engine, model, ckpt_dir: Path, tag: str, zero_stage: int, hyperparameters: list[dict]) -> int:
    """Finish a universal load: ZeRO-3's optimizer repaired, frozen parameters restored; returns how many were.

    `hyperparameters`: `compat.optimizer_hyperparameters` of the optimizer before the load.
    """
    from vla_scale.compat import repair_zero3_universal_load

    if zero_stage == 3:
        repair_zero3_universal_load(engine, hyperparameters)
    return restore_frozen(model, ckpt_dir, tag)


def restore_frozen(model, ckpt_dir: Path, tag: str) -> int:
    """Copy `<ckpt_dir>/<tag>`'s values into every parameter that does not train now; returns how many.

    Why: a universal load skips the module file, and a parameter that an earlier stage trained and
    the current one freezes would fall back to its value at build time. A frozen parameter has no fp32
    master; its saved value is what it held, so the copy is exact (bf16 included). Under ZeRO-3 each
    one is gathered, written by rank 0 and partitioned again.
    """
    import deepspeed

    from vla_scale.train.export import load_fp32_state_dict

    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    if not frozen:
        return 0
    rank = dist.get_rank() if dist.is_initialized() else 0
    # Under ZeRO-3 only rank 0 writes the gathered values: the other ranks neither read the checkpoint's full
    # fp32 weights (a model's worth of memory each) nor check them; rank 0's verdict reaches them.
    all_partitioned = all(hasattr(p, "ds_id") for _, p in frozen)
    reads = rank == 0 or not all_partitioned
    saved = load_fp32_state_dict(ckpt_dir.parent, tag) if reads else {}
    missing = [n for n, _ in frozen if n not in saved] if reads else []
    if all_partitioned and dist.is_initialized():
        verdict = [missing]
        dist.broadcast_object_list(verdict, src=0)
        missing = verdict[0]
    if missing:
        raise RuntimeError(
            f"{ckpt_dir / tag} holds no value for {len(missing)} frozen parameters ({', '.join(missing[:3])}, ...): "
            "it cannot be resumed on another number of ranks; resume on the world size that wrote it"
        )
    for name, p in frozen:
        if hasattr(p, "ds_id"):  # ZeRO-3 partitioned
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    p.data.copy_(saved[name].view(p.shape))
        else:
            p.data.copy_(saved[name].view(p.shape))
    return len(frozen)


def _convert(ckpt_dir: Path, tag: str, out_dir: Path) -> None:
    tmp = out_dir / f".{tag}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"[vla_scale] converting {ckpt_dir / tag} to a universal checkpoint for the new world size", flush=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt_dir / tag)]
    cmd += ["--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"ds_to_universal failed on {ckpt_dir / tag} (exit {proc.returncode}); resume on the world size "
            f"that wrote it.\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    for name in os.listdir(ckpt_dir / tag):  # our meta file and anything else DeepSpeed does not copy
        src = ckpt_dir / tag / name
        if src.is_file() and not (tmp / name).exists():
            shutil.copy2(src, tmp / name)
    os.replace(tmp, out_dir / tag)
