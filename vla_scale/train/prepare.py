"""The launcher's first step, run once before any process group exists.

It resolves and validates the config, checks the datasets (`dataset_checks`), writes the
random-weight checkpoint of tiny demo/test backbones that every rank then loads with
`from_pretrained`, checks what needs the backbone's tokenizer, and only then writes
`config.yaml`, `ds_config.json` and `accelerate_config.yaml` (for launchers/accelerate.sh) into the run
directory (each atomically). So a refused
run (a bad config, a resume at another world size without `data.elastic`) leaves the run directory as it was. Every
mistake it can see costs seconds here instead of a failed multi-node job. What trains but
perhaps not as meant (a stage after train.max_steps, constant dimensions) is printed as a note
on stderr (stdout carries only the run directory, for the launchers).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from vla_scale.config import Config, ConfigError, load_config, save_config, validate
from vla_scale.config.load import write_text_atomic
from vla_scale.data.format import FormatError, Manifest
from vla_scale.model.backbones.registry import check_backbone_family
from vla_scale.model.backbones.tiny import ensure_tiny_backbone
from vla_scale.train import checkpoint
from vla_scale.train.accelerate_config import build_accelerate_config
from vla_scale.train.dataset_checks import check_robot_sources
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.resume_check import check_same_run, world_size_change


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
    check_same_spaces(cfg, manifests)
    return manifests


def check_same_spaces(cfg: Config, manifests: list[Manifest]) -> None:
    """One model trains on every robot source, so their declared action/state spaces must agree (same binary
    gripper dims, dimension names where both declare them, normalisation and action mode)."""
    robot = [(i, m) for i, m in enumerate(manifests) if m.kind == "robot"]
    first, base = robot[0]
    for i, m in robot[1:]:
        diff = base.robot_spaces.difference(m.robot_spaces)
        if diff:
            raise ConfigError(
                f"data.sources: robot datasets {cfg.data.sources[first].path} ({base.name}) and "
                f"{cfg.data.sources[i].path} ({m.name}) declare different action/state spaces ({diff}); one model "
                "trains on both, so convert them to one layout (the converters' --binary-gripper-dims, "
                "--normalization, --action-mode; see README 'Datasets') or train on them separately"
            )


def check_discrete_vocabulary(cfg: Config) -> None:
    """`model.discrete.n_bin` must fit in the backbone's vocabulary: read from its tokenizer, not its weights.

    Skipped when the tokenizer cannot be read here (a hub id without network): the ranks check it on load.
    """
    if cfg.model.action_space != "discrete":
        return
    from transformers import AutoTokenizer  # ~3 s, only for discrete-action runs

    from vla_scale.model.action_tokenizer import ActionTokenizer

    backbone, d = cfg.model.backbone, cfg.model.discrete
    try:
        tokenizer = AutoTokenizer.from_pretrained(backbone.pretrained, trust_remote_code=backbone.trust_remote_code)
    except (OSError, ValueError):
        return
    try:
        ActionTokenizer(tokenizer, d.n_bin, d.min_action, d.max_action)  # the check the model runs when built
    except ValueError as err:
        raise ConfigError(f"{err} (the tokenizer of {backbone.pretrained}); lower model.discrete.n_bin") from err


def stage_notes(cfg: Config) -> list[str]:
    """Stages that start at or after train.max_steps: allowed (a run may be resumed with a larger max_steps, as
    the stop-and-resume workflow does), but this run alone never reaches them, so prepare says so."""
    t = cfg.train
    return [
        f"train.stages.{i}.start_step ({stage.start_step}) is not below train.max_steps ({t.max_steps}): this run "
        f"ends before stage {i} starts; raise train.max_steps (now or on resume) or remove the stage"
        for i, stage in enumerate(t.stages)
        if stage.start_step >= t.max_steps
    ]


def prepare_run(config_path: str | Path | None, overrides: Sequence[str], world_size: int) -> Path:
    """Validate everything and lay out the run directory; returns its path. Notes go to stderr."""
    cfg = load_config(config_path, overrides)
    validate(cfg, world_size)
    notes = check_robot_sources(cfg, check_datasets(cfg)) + stage_notes(cfg)
    try:
        check_backbone_family(cfg.model.backbone.family)  # the name only: imports no transformers
    except (KeyError, ValueError) as err:
        raise ConfigError(f"model.backbone.family: {err}") from err
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    check_same_run(run_dir, cfg, world_size)  # a reused run directory must hold the same run (and world size)
    meta = checkpoint.read_meta(run_dir / "checkpoints") if run_dir.is_dir() else None
    resize = world_size_change(run_dir / "checkpoints", meta, cfg, world_size) if meta else None
    notes += [resize] if resize else []
    ds_config = build_ds_config(cfg, world_size)
    # Before the ranks start: under a process group, save_pretrained writes weights on rank 0 only.
    ensure_tiny_backbone(cfg.model.backbone, seed=cfg.run.seed)
    if cfg.model.clip_reg.enabled:
        from vla_scale.model.clip_regularizer import ensure_tiny_clip  # transformers: ~3 s, only for this

        ensure_tiny_clip(cfg.model.clip_reg, seed=cfg.run.seed)
    check_discrete_vocabulary(cfg)
    # Last, once nothing can be refused any more; each file atomically, so a kill never leaves half of one.
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    write_text_atomic(run_dir / "ds_config.json", json.dumps(ds_config, indent=2))
    accelerate_config = build_accelerate_config(run_dir / "ds_config.json", world_size)
    write_text_atomic(run_dir / "accelerate_config.yaml", yaml.safe_dump(accelerate_config, sort_keys=False))
    for note in notes:
        print(f"vla-scale prepare: note: {note}", file=sys.stderr)
    return run_dir
