"""The `eval:` section: off by default, its cadence tied to checkpoints, and free to change on resume."""

from pathlib import Path

import pytest
import yaml

from vla_scale.config import ConfigError, config_diff, load_config, save_config, to_dict
from vla_scale.config.schema import PeriodicEvalConfig

ROOT = Path(__file__).resolve().parents[2]
DEBUG = ROOT / "configs/debug.yaml"  # train.ckpt_every: 2


def test_off_by_default():
    cfg = load_config(DEBUG)
    assert cfg.eval == PeriodicEvalConfig()
    assert not cfg.eval.enabled


def test_every_steps_on_checkpoint_steps():
    cfg = load_config(DEBUG, ["eval.suite=instruct", "eval.every_steps=4", "eval.tasks=[touch_red]"])
    assert cfg.eval.enabled and cfg.eval.every_steps == 4 and cfg.eval.tasks == ["touch_red"]


@pytest.mark.parametrize(
    "overrides",
    [
        ["eval.every_steps=3"],  # not a multiple of 2
        ["eval.every_steps=4", "train.ckpt_every=0"],  # no periodic checkpoints at all
    ],
)
def test_every_steps_not_on_a_checkpoint_names_both_keys(overrides):
    with pytest.raises(ConfigError, match=r"eval\.every_steps \(\d+\) must be a multiple of train\.ckpt_every"):
        load_config(DEBUG, ["eval.suite=instruct", *overrides])


def test_cadence_ignored_while_off():
    assert load_config(DEBUG, ["eval.every_steps=3"]).eval.every_steps == 3


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("eval.suite=instruckt", r"eval\.suite: unknown simulator suite 'instruckt'\. Did you mean 'instruct'"),
        ("eval.episodes=0", r"eval\.episodes must be >= 1"),
        ("eval.exec_steps=0", r"eval\.exec_steps must be >= 1"),
        ("eval.workers=-1", r"eval\.workers must be >= 0"),
        ("eval.final_wait_s=-1", r"eval\.final_wait_s must be >= 0"),
        ("eval.at_end=false", r"nothing would be evaluated"),
        ("eval.rtc=true", r"eval\.overlap and eval\.rtc need eval\.delay"),
        ("eval.overlap=3", r"eval\.overlap and eval\.rtc need eval\.delay"),
        ("eval.delay=-1", r"eval\.delay must be >= 0"),
    ],
)
def test_bad_values_name_the_key(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG, ["eval.suite=instruct", override])


def test_eval_settings_may_change_on_resume(tmp_path):
    before = load_config(DEBUG)
    after = load_config(DEBUG, ["eval.suite=instruct", "eval.every_steps=2", "eval.episodes=3"])
    assert config_diff(before, after) == []
    assert config_diff(before, after, ignore=()) != []  # the keys do differ; the default diff allows it
    # A run directory written before the section existed has no `eval` key at all.
    save_config(before, tmp_path / "config.yaml")
    old = yaml.safe_load((tmp_path / "config.yaml").read_text())
    del old["eval"]
    assert config_diff(old, to_dict(after)) == []
    assert config_diff(old, to_dict(load_config(DEBUG, ["train.zero_stage=3"]))) == ["train.zero_stage: 2 -> 3"]


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (["eval.delay=3", "eval.overlap=2"], r"eval\.overlap \(2\) < eval\.delay \(3\)"),
        (["eval.delay=2", "eval.exec_steps=4"], r"leave eval\.exec_steps at 1 and eval\.ensemble off"),
        (["eval.delay=2", "eval.ensemble=true"], r"leave eval\.exec_steps at 1 and eval\.ensemble off"),
    ],
)
def test_simulated_delay_settings_are_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(DEBUG, ["eval.suite=instruct", *overrides])
    ok = load_config(DEBUG, ["eval.suite=instruct", "eval.delay=2", "eval.overlap=4", "eval.rtc=true"]).eval
    assert (ok.delay, ok.overlap, ok.rtc) == (2, 4, True)
