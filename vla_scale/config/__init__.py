"""Run configuration: typed schema, YAML loading, overrides and validation."""

from vla_scale.config.load import ConfigError, config_hash, load_config, save_config, to_dict, validate
from vla_scale.config.schema import Config

__all__ = ["Config", "ConfigError", "config_hash", "load_config", "save_config", "to_dict", "validate"]
