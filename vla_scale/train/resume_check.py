"""One answer to "is this the same run?", asked by every process that joins a run directory.

Three callers, one function: `vla-scale prepare` on node 0 before it (re)writes the run directory,
`vla-scale run-dir --wait-for` on every other node once node 0 has prepared it, and each training
rank before it builds anything. They differ only in how strict the config comparison is and in
whether the directory must already be prepared; the checks themselves live here once:

- the global batch splits evenly over the ranks (`build_ds_config` raises otherwise);
- the saved `config.yaml` matches (`config_diff`), up to `RESUMABLE_CHANGES` and keys added to the schema since the
  run began that keep their defaults (or exactly, for nodes joining node 0);
- the prepared `ds_config.json` is the one this world size produces;
- the `latest` checkpoint was written by as many ranks (or, with `data.elastic`, may be resumed on this many:
  `world_size_change` says what will happen), in a stage the stage list still has.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from vla_scale.config import Config, ConfigError
from vla_scale.config.compare import RESUMABLE_CHANGES, config_diff
from vla_scale.train import checkpoint
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.stages import stage_configs


def check_same_run(
    run_dir: str | Path, cfg: Config, world_size: int, *, exact: bool = False, prepared: bool = False
) -> None:
    """Raise ConfigError unless `run_dir` may be (re)joined by a job running `cfg` on `world_size` ranks.

    `exact`: the saved config must equal `cfg` in every key (nodes > 0 joining node 0's run); otherwise
    the keys in `RESUMABLE_CHANGES` may differ (a resume with a longer schedule). `prepared`: the run
    directory must already hold `config.yaml` and a `ds_config.json` for this world size (ranks, and
    nodes > 0); otherwise a missing directory is a fresh run.
    """
    run_dir = Path(run_dir)
    ds_config = build_ds_config(cfg, world_size)  # raises unless the global batch splits over the ranks
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        if prepared:
            raise ConfigError(
                f"{config_file} does not exist although the run should be prepared: run `vla-scale prepare` "
                "first (launchers/train.sh does), and on several nodes put run.output_dir on a filesystem "
                "every node shares, at the same path"
            )
        return
    try:
        saved = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as err:  # cut short by a kill, from before prepare wrote it atomically
        raise ConfigError(
            f"{config_file} is not readable YAML ({err.__class__.__name__}); it may have been cut short by a kill. "
            "Restore it from the checkpoint's run, or choose a new run.name"
        ) from None
    # a resume after upgrading vla_scale: keys added since the run began are fine at their defaults
    changed = config_diff(saved, cfg, ignore=() if exact else RESUMABLE_CHANGES, new_keys_at_default=not exact)
    if changed:
        details = ", ".join(changed)
        hint = "start every node alike" if exact else "resume with the same settings or choose a new run.name"
        raise ConfigError(f"run directory {run_dir} holds a run with a different config ({details}); {hint}")
    ds_file = run_dir / "ds_config.json"
    if prepared and (not ds_file.is_file() or json.loads(ds_file.read_text()) != ds_config):
        raise ConfigError(
            f"{ds_file} was prepared for another world size than this job's {world_size} ranks; start the run "
            "through launchers/train.sh so prepare and launch agree, and give every node the same NUM_NODES "
            "and ranks per node"
        )
    ckpt_dir = run_dir / "checkpoints"
    meta = checkpoint.read_meta(ckpt_dir)
    if meta is None:
        return
    world_size_change(ckpt_dir, meta, cfg, world_size)
    n_stages = len(stage_configs(cfg))
    if meta["stage"] >= n_stages:
        raise ConfigError(
            f"the checkpoint in {ckpt_dir} was written in stage {meta['stage']} but train.stages now lists "
            f"{n_stages}; restore the stage list the run was started with"
        )


# ZeRO-0 keeps the whole optimizer state in the model file; ZeRO 1-3 partition it and go through DeepSpeed's
# universal checkpoints (train/universal.py), which also covers train.stages and LoRA (the stage's optimizer over
# its trainable names; frozen parameters copied from the checkpoint).
def world_size_change(ckpt_dir: Path, meta: dict, cfg: Config, world_size: int) -> str | None:
    """None when `latest` was written by `world_size` ranks (or is older than the world size record); otherwise
    what resuming it on `world_size` ranks will do, for `prepare` to print. Raises ConfigError when it cannot."""
    old = meta.get("world_size")
    if old in (None, world_size):
        return None
    refused = f"the checkpoint in {ckpt_dir} was written by {old} ranks and this job has {world_size}"
    if not (cfg.data.elastic and meta.get("data_elastic")):
        raise ConfigError(
            f"{refused}; resume with the same number of ranks (the data stream position is per rank), or start "
            "runs with data.elastic=true to make them resumable on another number of ranks"
        )
    t = cfg.train
    how = "converted once to a DeepSpeed universal checkpoint and " if t.zero_stage else ""
    frozen = ", and parameters the stage freezes are copied from the checkpoint" if t.zero_stage else ""
    return (
        f"the checkpoint at step {meta.get('step')} was written by {old} ranks and this job has {world_size}: the "
        f"global batch stays {t.global_batch_size} (gradient accumulation {t.grad_accum(old)} -> "
        f"{t.grad_accum(world_size)}), the data stream continues at that global step (data.elastic: the same "
        f"samples, mixing and augmentation as without the change), the ZeRO-{t.zero_stage} optimizer state "
        f"(fp32 weights, Adam moments) is {how}re-partitioned over the new ranks unchanged{frozen}; losses match an "
        "unchanged run up to the order of float reductions"
    )
