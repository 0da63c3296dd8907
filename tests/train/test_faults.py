"""Non-finite steps: the guard's bookkeeping, GuardedAdamW's refusal, and the NaN injection hook."""

import math

import pytest
import torch

from vla_scale.config import ConfigError
from vla_scale.config.schema_debug import parse_inject_nan
from vla_scale.train.engine import GuardedAdamW
from vla_scale.train.faults import NanInjector, StepGuard, TooManyBadSteps, nonfinite_terms


def _out(arm: float) -> dict[str, torch.Tensor]:
    return {"loss": torch.tensor(arm + 1.0), "loss_arm": torch.tensor(arm), "loss_gripper": torch.tensor(1.0)}


def test_guard_counts_skips_and_stops_after_k_in_a_row_naming_step_and_term():
    guard = StepGuard(max_bad_steps=3, fp16=False)
    assert guard.after_step(1, False, [_out(0.5)]) is False
    assert guard.after_step(2, True, [_out(math.nan)]) is True
    assert guard.after_step(3, False, [_out(0.5)]) is False  # a clean step resets the streak
    guard.after_step(4, True, [_out(0.5), _out(math.nan)])
    guard.after_step(5, True, [_out(math.inf)])
    with pytest.raises(TooManyBadSteps, match=r"steps 4-6: 3 optimizer steps in a row.*at step 6 in loss, loss_arm"):
        guard.after_step(6, True, [_out(math.nan)])
    assert guard.skipped_total == 4


def test_gradient_only_faults_are_named_as_such():
    guard = StepGuard(max_bad_steps=1, fp16=False)
    with pytest.raises(TooManyBadSteps, match="the gradients"):
        guard.after_step(7, True, [_out(0.5)])


def test_fp16_overflow_skips_with_finite_loss_are_not_faults():
    guard = StepGuard(max_bad_steps=1, fp16=True)
    for step in range(1, 5):
        assert guard.after_step(step, True, [_out(0.5)]) is True
    assert guard.skipped_total == 4
    with pytest.raises(TooManyBadSteps):
        guard.after_step(5, True, [_out(math.nan)])


def test_guarded_adamw_refuses_non_finite_gradients():
    p = torch.nn.Parameter(torch.ones(3))
    opt = GuardedAdamW([p], lr=0.1)
    p.grad = torch.tensor([1.0, math.nan, 0.0])
    opt.step()
    assert opt.overflow and torch.equal(p.detach(), torch.ones(3)) and not opt.state
    p.grad = torch.tensor([1.0, 1.0, 1.0])
    opt.step()
    assert not opt.overflow and not torch.equal(p.detach(), torch.ones(3))


def test_injection_spec_and_hook():
    """`debug.inject_nan` parsed by the config, applied per rank by the hook."""
    spec = parse_inject_nan("loss_arm@3,4")
    assert (spec.term, spec.steps) == ("loss_arm", {3, 4})
    on_rank1 = parse_inject_nan("loss_arm@3:rank1")
    assert NanInjector(rank=0, injection=on_rank1).injection is None
    assert NanInjector(rank=1, injection=on_rank1).injection.steps == {3}
    with pytest.raises(ConfigError, match="expected"):
        parse_inject_nan("loss_arm")
    hook = NanInjector(rank=0, injection=parse_inject_nan("loss_arm@2"))
    assert hook(1, _out(0.5))["loss"].item() == 1.5
    poisoned = hook(2, _out(0.5))
    assert nonfinite_terms([poisoned]) == ["loss", "loss_arm"]
    with pytest.raises(KeyError, match="no term 'loss_vl'"):
        NanInjector(rank=0, injection=parse_inject_nan("loss_vl@1"))(1, _out(0.5))
