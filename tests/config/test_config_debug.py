"""`debug:` drill hooks: defaults off, the inject_nan syntax checked at load time with errors that name the key."""

from pathlib import Path

import pytest

from vla_scale.config import ConfigError, load_config, save_config, validate
from vla_scale.config.schema_debug import DebugConfig, NanInjection, parse_inject_nan

ROOT = Path(__file__).resolve().parents[2]
DEBUG_YAML = ROOT / "configs/debug.yaml"


def test_debug_hooks_are_off_by_default():
    d = load_config(DEBUG_YAML).debug
    assert (d.inject_nan, d.save_pause_s, d.shm_allreduce) == ("", 0.0, False)
    assert d.nan_injection() is None


def test_debug_overrides_load_and_round_trip(tmp_path):
    cfg = load_config(
        DEBUG_YAML, ["debug.inject_nan=loss_arm@3,4:rank1", "debug.save_pause_s=300", "debug.shm_allreduce=true"]
    )
    assert cfg.debug.nan_injection() == NanInjection("loss_arm", frozenset({3, 4}), 1)
    assert cfg.debug.save_pause_s == 300.0 and cfg.debug.shm_allreduce is True
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize(
    "text, expected",
    [
        ("loss@2", NanInjection("loss", frozenset({2}), None)),
        ("loss@2,3,4", NanInjection("loss", frozenset({2, 3, 4}), None)),
        ("loss@2:rank1", NanInjection("loss", frozenset({2}), 1)),
        ("loss_clip@1:rank0", NanInjection("loss_clip", frozenset({1}), 0)),
        ("", None),
    ],
)
def test_inject_nan_syntax_of_the_old_env_var_parses(text, expected):
    assert parse_inject_nan(text) == expected


@pytest.mark.parametrize(
    "value, pattern",
    [
        ("loss", r"debug\.inject_nan='loss': expected 'term@step"),
        ("@3", r"debug\.inject_nan='@3': expected 'term@step"),
        ("loss@", r"debug\.inject_nan='loss@': expected 'term@step"),
        ("loss_amr@3", r"'loss_amr' is not a loss term.*Did you mean 'loss_arm'"),
        ("loss@three", r"step 'three' must be an optimizer step >= 1"),
        ("loss@0", r"step '0' must be an optimizer step >= 1"),
        ("loss@3:node1", r"'node1' must look like rank0, rank1"),
    ],
)
def test_bad_inject_nan_is_rejected_at_load_naming_the_key(value, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG_YAML, [f"debug.inject_nan={value}"])


def test_inject_nan_with_empty_rank_suffix_is_rejected():
    with pytest.raises(ConfigError, match=r"debug\.inject_nan='loss@3:': expected 'term@step"):
        parse_inject_nan("loss@3:")
    with pytest.raises(ConfigError, match=r"debug\.inject_nan: expected a string"):  # YAML reads `loss@3:` as a map
        load_config(DEBUG_YAML, ["debug.inject_nan=loss@3:"])


def test_inject_nan_rank_must_exist_in_the_job():
    cfg = load_config(DEBUG_YAML, ["debug.inject_nan=loss@2:rank3"])  # rank unknown until the world size is
    validate(cfg, 4)
    with pytest.raises(ConfigError, match=r"debug\.inject_nan='loss@2:rank3' names rank3 but the job has 2 ranks"):
        validate(cfg, 2)


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("debug.save_pause_s=-1", r"debug\.save_pause_s must be >= 0"),
        ("debug.save_pause_s=soon", r"debug\.save_pause_s: expected a number"),
        ("debug.shm_allreduce=1", r"debug\.shm_allreduce: expected true or false"),
        ("debug.inject_nans=loss@2", r"unknown config key 'debug\.inject_nans'.*'inject_nan'"),
        ("debg.save_pause_s=1", r"'debg'.*'debug'"),
    ],
)
def test_bad_debug_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG_YAML, [override])


def test_debug_section_validates_on_its_own_with_its_prefix():
    DebugConfig().validate()
    with pytest.raises(ConfigError, match=r"drill\.save_pause_s must be >= 0"):
        DebugConfig(save_pause_s=-0.5).validate("drill")
