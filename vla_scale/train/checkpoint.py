"""Training checkpoints: DeepSpeed engine state + our client state, a `latest` pointer, keep-last-K.

Layout under `<run_dir>/checkpoints/`:
- `step_XXXXXXXX/` — what `engine.save_checkpoint` writes (model, optimizer and
  scheduler states per rank, DeepSpeed's `zero_to_fp32.py`) plus our client state;
- `universal/<tag>` — a conversion for resuming on another world size (`universal.py`), removed by
  the next save;
- `latest` — the tag of the newest *complete* checkpoint, in DeepSpeed's own format,
  replaced atomically only after every rank has finished writing, so a job killed
  during a save resumes from the previous checkpoint.

`debug.save_pause_s` (the `pause_s` argument of `save`) holds every rank inside the save, after
the files are written and before `latest` moves: a drill hook for testing a kill during a save.

`vla-scale prepare` reads `latest` and the meta file before any rank starts; torch (and `universal`, which
needs it) is imported by `save` only, so that step does not pay torch's import (~1 s per launch).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

LATEST = "latest"
META = "vla_scale_state.json"  # step and stage, readable before an engine exists (the stage decides its shape)


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def read_latest(ckpt_dir: str | Path) -> str | None:
    """Tag named by the `latest` pointer, or None when there is no complete checkpoint."""
    path = Path(ckpt_dir) / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (Path(ckpt_dir) / tag).is_dir() else None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / LATEST)


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep_last: int, pause_s: float = 0.0) -> str:
    """Collective: every rank calls it. Returns the tag written; `pause_s` is the `debug.save_pause_s` drill."""
    import torch.distributed as dist

    from vla_scale.train import universal

    ckpt_dir = Path(ckpt_dir)
    tag = tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    if pause_s > 0:
        print(f"[vla_scale] pausing {pause_s}s inside the save of {tag} (debug.save_pause_s)", flush=True)
        time.sleep(pause_s)
    if dist.get_rank() == 0:
        meta = {"step": step, "stage": client_state.get("stage", 0), "world_size": client_state.get("world_size")}
        meta["data_elastic"] = bool(client_state.get("data", {}).get("elastic"))  # resumable on other world sizes
        (ckpt_dir / tag / META).write_text(json.dumps(meta))
    dist.barrier()
    if dist.get_rank() == 0:
        _write_latest(ckpt_dir, tag)
        universal.prune(ckpt_dir)  # conversions of older tags: only a resume from them needed them
        if keep_last > 0:
            _prune(ckpt_dir, keep_last, protect=tag)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, keep_last: int, protect: str) -> None:
    tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for old in tags[:-keep_last]:
        if old != protect:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)


def read_meta(ckpt_dir: str | Path) -> dict | None:
    """Step, stage and world size of the `latest` checkpoint, or None when starting fresh."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    path = Path(ckpt_dir) / tag / META
    return json.loads(path.read_text()) if path.is_file() else {"step": None, "stage": 0, "world_size": None}


def load_latest(engine, ckpt_dir: str | Path, load_dir: str | Path | None = None) -> dict | None:
    """Restore the engine from `latest`; returns the client state, or None when starting fresh. `load_dir`: where
    that tag is read from instead (its universal conversion, `universal.convert`)."""
    tag = read_latest(ckpt_dir)
    if tag is None:
        return None
    _, client_state = engine.load_checkpoint(str(load_dir or ckpt_dir), tag=tag)
    return client_state
