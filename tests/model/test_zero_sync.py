"""zero_touch: a zero-valued term that gives every touched parameter an exact zero gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vla_scale.model.zero_sync import zero_touch


def test_zero_value_and_zero_gradients_for_every_input():
    torch.manual_seed(0)
    used, idle_a, idle_b = nn.Linear(4, 1), nn.Linear(4, 3), nn.Linear(4, 2).to(torch.bfloat16)
    x = torch.randn(5, 4)
    loss = used(x).square().mean()
    touched = loss + zero_touch(idle_a(x), idle_b(x.to(torch.bfloat16)))
    assert touched.dtype == torch.float32 and touched.item() == loss.item()
    touched.backward()
    assert used.weight.grad.abs().sum() > 0
    for module in (idle_a, idle_b):
        for p in module.parameters():
            assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p)), "a touched parameter gets 0"


def test_without_a_touch_the_idle_module_has_no_gradient():
    """What zero_touch prevents: an idle module's parameters simply miss from the gradient set."""
    used, idle = nn.Linear(4, 1), nn.Linear(4, 1)
    used(torch.randn(2, 4)).sum().backward()
    assert idle.weight.grad is None


def test_needs_a_tensor():
    with pytest.raises(ValueError, match="at least one tensor"):
        zero_touch()
