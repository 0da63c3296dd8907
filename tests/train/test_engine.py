"""Engine pieces that need no process group: optimizer groups, LR schedule, DeepSpeed config (CPU info: test_compat)."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from vla_scale.config import load_config
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.engine import lr_lambda, param_groups

ROOT = Path(__file__).resolve().parents[2]


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(5, 4)
        self.action_token = nn.Parameter(torch.zeros(4))
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_no_weight_decay_on_biases_norms_embeddings_and_action_tokens():
    decay, no_decay = param_groups(_Toy(), weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) == 1 and decay["params"][0].shape == (4, 4)  # linear.weight only
    assert len(no_decay["params"]) == 5  # embedding, action token, linear bias, norm weight + bias; frozen left out


def test_lr_schedule_warmup_then_cosine_to_min_ratio():
    cfg = load_config(ROOT / "configs/debug.yaml").optim
    cfg.warmup_steps, cfg.schedule, cfg.min_lr_ratio = 10, "cosine", 0.1
    fn = lr_lambda(cfg, max_steps=110)
    assert fn(0) == pytest.approx(0.1) and fn(9) == pytest.approx(1.0)
    assert fn(10) == pytest.approx(1.0) and fn(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert fn(110) == pytest.approx(0.1) and fn(500) == pytest.approx(0.1)


def test_ds_config_carries_precision_offload_and_accumulation():
    cfg = load_config(
        ROOT / "configs/debug.yaml",
        ["train.zero_stage=3", "train.offload_optimizer=true", "train.offload_params=true", "train.bf16=true"],
    )
    ds = build_ds_config(cfg, world_size=2)
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]
    assert ds["bf16"] == {"enabled": True, "check_grad_overflow": True} and ds["fp16"]["enabled"] is False
    assert ds["gradient_accumulation_steps"] * 2 * ds["train_micro_batch_size_per_gpu"] == ds["train_batch_size"]
    assert build_ds_config(cfg, world_size=1)["gradient_accumulation_steps"] == 2 * ds["gradient_accumulation_steps"]
