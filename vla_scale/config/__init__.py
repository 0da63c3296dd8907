"""Run configuration: typed schema with per-section validation, YAML loading, overrides, hash and diff."""

from vla_scale.config.compare import config_diff, config_hash
from vla_scale.config.errors import ConfigError
from vla_scale.config.load import load_config, save_config, to_dict
from vla_scale.config.schema import Config, validate

__all__ = ["Config", "ConfigError", "config_diff", "config_hash", "load_config", "save_config", "to_dict", "validate"]
