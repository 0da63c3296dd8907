"""YAML → typed `Config`, with `a.b.c=value` overrides and errors that name the key.

This module reads YAML, applies overrides and converts plain values into the schema's
dataclasses (unknown keys and wrong types rejected with a close-match hint); what values may
be combined is each section's own `validate` (see `vla_scale.config.schema`). All of it runs
before any process group starts: the launcher calls `load_config` in its prepare step, so a
typo costs seconds, not a cluster queue.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
import uuid
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from vla_scale.config.compare import config_hash
from vla_scale.config.errors import ConfigError, suggest
from vla_scale.config.schema import Config, validate
from vla_scale.config.schema_model import validate_history

# Re-exported: callers import these from here (vla_scale.train, vla_scale.model).
__all__ = [
    "ConfigError",
    "apply_override",
    "config_hash",
    "config_section",
    "load_config",
    "save_config",
    "to_dict",
    "validate",
    "validate_history",
    "write_text_atomic",
]

_FLOAT_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


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
            hint = suggest(str(value), [str(a) for a in allowed]) if isinstance(value, str) else ""
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
            raise ConfigError(f"unknown config key '{full}'.{suggest(str(key), names)}")
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
    for i, part in enumerate(path):
        if isinstance(node, list):
            if not re.fullmatch(r"[0-9]+", part) or int(part) >= len(node):
                where = ".".join(path[:i])
                items = f"address one as {where}.<0..{len(node) - 1}> or" if node else "it is empty:"
                raise ConfigError(
                    f"override {'.'.join(path)}: list {where} has only {len(node)} items; {items} set the whole "
                    f"list, e.g. {where}=[...]"
                )
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {'.'.join(path)}: {'.'.join(path[:i])} is {node!r}, not a section")
        if i == len(path) - 1:
            node[part] = value
        elif isinstance(node, dict) and node.get(part) is None:
            node[part] = [] if re.fullmatch(r"[0-9]+", path[i + 1]) else {}
        node = node[part]


def read_yaml(path: Path) -> dict:
    """A YAML mapping from `path`; a syntax error names the file, line and column instead of a parser traceback."""
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err)
        context = getattr(err, "context", None)
        detail = f"{context}, {problem}" if context else problem
        raise ConfigError(
            f"{where}: YAML syntax error ({detail}); fix the file at that line and column"
            " (check the indentation, which takes spaces, not tabs, a missing ':' or an unclosed bracket or quote)"
        ) from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file ({err.reason} at byte {err.start}); give a YAML run file") from None
    if tree is None:
        return {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (run:, data:, ...), got {type(tree).__name__}")
    return tree


def load_config(path: str | Path | None, overrides: typing.Sequence[str] = ()) -> Config:
    """Read a YAML run file, apply overrides, type-check, fill derived defaults and validate."""
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        tree = read_yaml(path)
    for text in overrides:
        keys, value = _parse_override(text)
        apply_override(tree, keys, value)
    cfg = _build(Config, tree, "")  # Config.__post_init__ fills the derived defaults
    cfg.validate()
    return cfg


def to_dict(cfg: Config) -> dict:
    """Plain-data view of a config (what gets written to the run directory)."""
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with `load_config`), atomically."""
    write_text_atomic(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace `path` by `text` in one step: a temporary file in the same folder, synced, then `os.replace`.

    A process killed mid-write leaves the old file (or none) and a stray `.<name>.*.tmp`, never half a file:
    a run directory whose config.yaml is cut short would refuse to start or resume.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")  # open(): the umask's mode
    try:
        with open(tmp, "x") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
