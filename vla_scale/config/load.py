"""YAML → typed `Config`, with `a.b.c=value` overrides and errors that name the key.

All checks here run before any process group starts: the launcher calls
`load_config` in its prepare step, so a typo costs seconds, not a cluster queue.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from vla_scale.config.errors import ConfigError, suggest
from vla_scale.config.schema import TRAINABLE_GROUPS, Config, ModelConfig

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


_suggest = suggest


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp` and build nested dataclasses."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = _suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
            raise ConfigError(f"{key}: {value!r} is not one of {list(allowed)}.{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = get_args(tp)
        return [_convert(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__}")
        _, val_tp = get_args(tp)
        return {str(k): _convert(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads `3e-4` (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")  # pragma: no cover - schema bug


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{full}'.{_suggest(str(key), names)}")
        kwargs[key] = _convert(value, hints[key], full)
    return cls(**kwargs)


def config_section(cls: type, data: dict, key: str) -> Any:
    """Type-check one section on its own (e.g. the `model` block of an exported policy's vla_config.yaml)."""
    return _build(cls, data, key)


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw  # not a YAML scalar (e.g. `@3`): keep the text; the field's type check still applies
    return key.strip().split("."), value


def apply_override(tree: dict, path: list[str], value: Any) -> None:
    """Set `value` at `path` in a plain dict tree; list items are addressed by index."""
    node: Any = tree
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        if isinstance(node, list):
            node = node[int(part)]
            continue
        if part not in node or node[part] is None:
            node[part] = [] if nxt.isdigit() else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        idx = int(last)
        if idx >= len(node):
            raise ConfigError(f"override {'.'.join(path)}: list has only {len(node)} items")
        node[idx] = value
    else:
        node[last] = value


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML run file, apply overrides, type-check and validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        tree = yaml.safe_load(path.read_text()) or {}
    for text in overrides:
        keys, value = _parse_override(text)
        apply_override(tree, keys, value)
    cfg = _build(Config, tree, "")
    head = cfg.model.head
    if head.type in HISTORY_HEADS and head.max_history == 0:
        head.max_history = cfg.data.window_size  # resolved here so the run directory and export record it
    validate(cfg)
    return cfg


def validate(cfg: Config, world_size: int | None = None) -> None:
    """Reject combinations that cannot run; `world_size` adds the batch-size check."""
    t = cfg.train
    if t.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"train.zero_stage: {t.zero_stage} is not a ZeRO stage; use 0, 1, 2 or 3")
    for key in ("max_steps", "micro_batch_size", "global_batch_size", "log_every"):
        if getattr(t, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})"
        )
    if world_size is not None and t.global_batch_size % (t.micro_batch_size * world_size):
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
            f"train.micro_batch_size x world size ({t.micro_batch_size} x {world_size}); "
            "change one of them or the number of ranks"
        )
    d = cfg.data
    if not d.sources:
        raise ConfigError("data.sources is empty: list at least one dataset folder with a manifest.json")
    for i, src in enumerate(d.sources):
        if not src.path:
            raise ConfigError(f"data.sources.{i}.path is empty")
        if src.weight < 0:
            raise ConfigError(f"data.sources.{i}.weight must be >= 0, got {src.weight}")
    if sum(s.weight for s in d.sources) <= 0:
        raise ConfigError("data.sources: at least one weight must be > 0")
    for key in ("window_size", "fwd_pred_next_n", "max_text_len", "shuffle_buffer"):
        if getattr(d, key) < 1:
            raise ConfigError(f"data.{key} must be >= 1, got {getattr(d, key)}")
    a = d.augment
    if len(a.crop_scale) != 2 or not 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1:
        raise ConfigError(f"data.augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {a.crop_scale}")
    for key in ("shift_px", "brightness", "contrast", "saturation"):
        if getattr(a, key) < 0:
            raise ConfigError(f"data.augment.{key} must be >= 0, got {getattr(a, key)}")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers must be >= 0, got {d.num_workers}")
    m = cfg.model
    if m.latent_num < 1:
        raise ConfigError(f"model.latent_num must be >= 1, got {m.latent_num}")
    if not m.backbone.pretrained:
        raise ConfigError("model.backbone.pretrained is empty: give a local folder or a hub id")
    if m.discrete.n_bin < 2:
        raise ConfigError(f"model.discrete.n_bin must be >= 2, got {m.discrete.n_bin}")
    if not m.discrete.min_action < m.discrete.max_action:
        raise ConfigError(
            f"model.discrete.min_action ({m.discrete.min_action}) must be < model.discrete.max_action "
            f"({m.discrete.max_action})"
        )
    # n_bin < vocabulary size is checked when the model is built (the vocabulary is the backbone's).
    validate_history(m, d.window_size)
    _validate_resampler_and_clip(m)
    for key, w in dataclasses.asdict(m.loss_weights).items():
        if w < 0:
            raise ConfigError(f"model.loss_weights.{key} must be >= 0, got {w}")
    o = cfg.optim
    if len(o.betas) != 2:
        raise ConfigError(f"optim.betas needs two numbers, got {o.betas}")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {o.min_lr_ratio}")
    _validate_engine(cfg)
    cfg.debug.validate("debug", world_size)


def _validate_engine(cfg: Config) -> None:
    """Precision, offload, LoRA and the unfreezing schedule."""
    t, lora = cfg.train, cfg.model.lora
    if t.bf16 and t.fp16:
        raise ConfigError("train.bf16 and train.fp16 are both on; pick one precision")
    if t.offload_optimizer and t.zero_stage == 0:
        raise ConfigError("train.offload_optimizer needs ZeRO: set train.zero_stage to 1, 2 or 3")
    if t.offload_params and t.zero_stage != 3:
        raise ConfigError("train.offload_params needs ZeRO-3: set train.zero_stage=3 (or turn offload_params off)")
    if t.max_bad_steps < 1:
        raise ConfigError(f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    if lora.enabled:
        if lora.r < 1 or lora.alpha <= 0:
            raise ConfigError(f"model.lora needs r >= 1 and alpha > 0, got r={lora.r}, alpha={lora.alpha}")
        if not 0.0 <= lora.dropout < 1.0:
            raise ConfigError(f"model.lora.dropout must be in [0, 1), got {lora.dropout}")
        if not lora.target_modules:
            raise ConfigError("model.lora.target_modules is empty: use [all-linear] or name modules like q_proj")
    previous = -1
    for i, stage in enumerate(t.stages):
        key = f"train.stages.{i}"
        if i == 0 and stage.start_step != 0:
            raise ConfigError(f"{key}.start_step must be 0: the first stage covers the start of the run")
        if stage.start_step <= previous:
            raise ConfigError(f"{key}.start_step ({stage.start_step}) must be greater than the previous stage's")
        previous = stage.start_step
        if stage.lr_scale <= 0:
            raise ConfigError(f"{key}.lr_scale must be > 0, got {stage.lr_scale}")
        if not stage.trainable:
            raise ConfigError(f"{key}.trainable is empty: name at least one parameter group")
        for name in stage.trainable:
            if name.startswith("re:") or re.fullmatch(r"decoder_last_[1-9][0-9]*", name):
                continue
            if name not in TRAINABLE_GROUPS:
                hint = _suggest(name, [*TRAINABLE_GROUPS, "decoder_last_2", "re:<regex>"])
                raise ConfigError(f"{key}.trainable: unknown parameter group {name!r}.{hint}")
            if name == "lora" and not lora.enabled:
                raise ConfigError(f"{key}.trainable names 'lora' but model.lora.enabled is false")


HISTORY_HEADS = ("lstm", "gpt")


def validate_history(m: ModelConfig, window_size: int | None = None) -> None:
    """History type x head x action space combinations (mechanism 4); `window_size` adds the head-memory check.

    Also called by `RoboVLM` itself, so a model built without `load_config` fails the same way.
    """
    head = m.head
    if head.type in HISTORY_HEADS:
        if m.history_type != "post":
            raise ConfigError(
                f"model.head.type={head.type} fuses the window over time itself and needs model.history_type: post; "
                f"with history_type {m.history_type} the VLM already sees the window: use model.head.type: mlp"
            )
        if m.action_space == "discrete":
            raise ConfigError(
                f"model.head.type={head.type} needs model.action_space: continuous (the discrete action space "
                "predicts action ids with the LM and has no head); set model.head.type: mlp"
            )
        if head.num_layers < 1:
            raise ConfigError(f"model.head.num_layers must be >= 1, got {head.num_layers}")
        if head.max_history < 0:
            raise ConfigError(f"model.head.max_history must be >= 0 (0: data.window_size), got {head.max_history}")
        if window_size is not None and head.max_history not in (0, window_size):
            raise ConfigError(
                f"model.head.max_history ({head.max_history}) must equal data.window_size ({window_size}) for "
                f"model.head.type={head.type}: the head trains on windows of window_size frames and keeps as many at "
                "inference; set it to 0 to follow data.window_size"
            )
    if head.type == "gpt" and (head.num_heads < 1 or head.hidden_size % head.num_heads):
        raise ConfigError(
            f"model.head.num_heads ({head.num_heads}) must be >= 1 and divide "
            f"model.head.hidden_size ({head.hidden_size})"
        )


def _validate_resampler_and_clip(m: ModelConfig) -> None:
    """Perceiver resampler sizes and the CLIP regulariser (mechanisms 9 and 10); both work with either action space
    and every backbone family (resampled images get 1D positions where a family's positions follow the patch grid)."""
    r = m.resampler
    for key in ("num_latents", "depth", "heads", "dim_head", "ff_mult"):
        if getattr(r, key) < 1:
            raise ConfigError(f"model.resampler.{key} must be >= 1, got {getattr(r, key)}")
    c = m.clip_reg
    if c.embed_dim < 1:
        raise ConfigError(f"model.clip_reg.embed_dim must be >= 1 (the CLIP model's projection_dim), got {c.embed_dim}")
    if c.enabled and not c.pretrained:
        raise ConfigError(
            "model.clip_reg.pretrained is empty: give a CLIP checkpoint (local folder or hub id, e.g. "
            "openai/clip-vit-base-patch32), or a missing folder plus model.clip_reg.tiny for a random tiny one"
        )
    if c.tiny is not None and (c.tiny.num_heads < 1 or c.tiny.hidden_size % c.tiny.num_heads):
        raise ConfigError(
            f"model.clip_reg.tiny.num_heads ({c.tiny.num_heads}) must be >= 1 and divide "
            f"model.clip_reg.tiny.hidden_size ({c.tiny.hidden_size})"
        )


def to_dict(cfg: Config) -> dict:
    """Plain-data view of a config (what gets written to the run directory)."""
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    """Stable short hash of the resolved config, stored in checkpoints."""
    blob = json.dumps(to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
