"""The launcher's first step, run once before any process group exists.

It resolves and validates the config, checks the datasets, writes `config.yaml` and
`ds_config.json` into the run directory and, for tiny demo/test backbones, writes the
random-weight checkpoint that every rank then loads with `from_pretrained`. Every
mistake it can see costs seconds here instead of a failed multi-node job.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from vla_scale.config import Config, ConfigError, load_config, save_config, validate
from vla_scale.data.format import FormatError, Manifest
from vla_scale.model.backbones.registry import check_backbone_family
from vla_scale.model.backbones.tiny import ensure_tiny_backbone
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.resume_check import check_same_run


def check_datasets(cfg: Config) -> list[Manifest]:
    """Every source must be a complete dataset; at least one must be robot data."""
    manifests = []
    for i, src in enumerate(cfg.data.sources):
        try:
            manifests.append(Manifest.load(src.path))
        except FormatError as err:
            raise ConfigError(f"data.sources.{i}.path: {err}") from err
    robot = [m for m in manifests if m.kind == "robot"]
    if not robot:
        raise ConfigError("data.sources: no robot dataset listed; the policy needs at least one")
    dims = {(m.action_dim, m.state_dim) for m in robot}
    if len(dims) > 1:
        raise ConfigError(f"data.sources: robot datasets disagree on (action_dim, state_dim): {sorted(dims)}")
    return manifests


def prepare_run(config_path: str | Path | None, overrides: Sequence[str], world_size: int) -> Path:
    """Validate everything and lay out the run directory; returns its path."""
    cfg = load_config(config_path, overrides)
    validate(cfg, world_size)
    check_datasets(cfg)
    try:
        check_backbone_family(cfg.model.backbone.family)  # the name only: imports no transformers
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model.backbone.family: {err}") from err
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    check_same_run(run_dir, cfg, world_size)  # a reused run directory must hold the same run
    ds_config = build_ds_config(cfg, world_size)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    (run_dir / "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    ensure_tiny_backbone(cfg.model.backbone, seed=cfg.run.seed)
    # Before the ranks start: under a process group, save_pretrained writes weights on rank 0 only.
    if cfg.model.clip_reg.enabled:
        from vla_scale.model.clip_regularizer import ensure_tiny_clip  # transformers: ~3 s, only for this

        ensure_tiny_clip(cfg.model.clip_reg, seed=cfg.run.seed)
    return run_dir
