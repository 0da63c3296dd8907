"""The flow-matching action expert (`model.action_space: flow`): loss and Euler sampler on hand-checked flows,
RoboVLM training, stop-gradient into the VLM, seeded sampling, two backbone families."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import A, N, S, robot_batch, vl_batch
from vla_scale.config.errors import ConfigError
from vla_scale.config.schema import BackboneConfig, ModelConfig, TinyBackboneConfig
from vla_scale.config.schema_model import FlowConfig
from vla_scale.model import build_model
from vla_scale.model.backbones import build_tiny_backbone
from vla_scale.model.flow import (
    euler_sample,
    flow_matching_loss,
    guided_euler_sample,
    inpainting_weights,
    sample_time,
)
from vla_scale.model.flow_expert import FlowExpert

STEPS = 800
STEPS_OVERFIT = 150
TINY_FLOW = FlowConfig(width=32, layers=1, heads=2, num_steps=4)


def _point(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)


@pytest.mark.parametrize("steps", [1, 10])
def test_exact_straight_line_field_reproduces_the_data_point(steps):
    x0, noise = _point()
    # The constant velocity of the straight line noise -> x0, and the conditional field (x_t - x0) / t of a
    # point mass at x0 (which depends on x and t): both integrate exactly to x0 from t = 1.
    constant = euler_sample(lambda x, t: noise - x0, noise, steps)
    conditional = euler_sample(lambda x, t: (x - x0) / t.view(-1, 1, 1), noise, steps)
    torch.testing.assert_close(constant, x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(conditional, x0, atol=1e-5, rtol=0)


def two_mode_field(modes: torch.Tensor):
    """The exact velocity of data that is one of the chunks `modes` `[K, N, A]` with equal odds: its predicted
    chunk is the posterior mean of the modes, which depends on x (so guidance has a gradient to follow)."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        tt = t.view(-1, 1, 1)
        d = ((x.unsqueeze(1) - (1 - tt).unsqueeze(1) * modes.unsqueeze(0)) ** 2).sum(dim=(2, 3))
        w = torch.softmax(-d / (2 * tt.view(-1, 1) ** 2), dim=1)
        return (x - torch.einsum("mk,kna->mna", w, modes)) / tt

    return velocity


def test_inpainting_weights_follow_the_rtc_schedule():
    w = inpainting_weights(8, prefix=5, frozen=2)
    assert w[:2].tolist() == [1.0, 1.0] and w[5:].tolist() == [0.0, 0.0, 0.0]
    assert all(1 > a > b > 0 for a, b in zip(w[2:5], w[3:5], strict=False))  # eased in, strictly decreasing
    assert inpainting_weights(4, prefix=2, frozen=2).tolist() == [1.0, 1.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="frozen"):
        inpainting_weights(4, prefix=2, frozen=3)


@pytest.mark.parametrize(("prefix", "frozen"), [(4, 2), (8, 0), (3, 3)])
def test_inpainting_continues_the_previous_chunk(prefix, frozen):
    """Two equally likely chunks (all zeros, all ones): plain sampling lands on either, depending on the noise;
    guided toward the start of the ones chunk, every sample lands on it, and zero weights change nothing."""
    n, a = 8, 3
    modes = torch.stack([torch.zeros(n, a), torch.ones(n, a)])
    velocity = two_mode_field(modes)
    noise = torch.randn(16, n, a, generator=torch.Generator().manual_seed(0))
    plain = euler_sample(velocity, noise, 10)
    landed = plain.mean(dim=(1, 2))
    assert (landed < 0.01).any() and (landed > 0.99).any()  # both modes occur without guidance
    target = modes[1].expand(16, n, a)
    guided = guided_euler_sample(velocity, noise, 10, target, inpainting_weights(n, prefix, frozen))
    torch.testing.assert_close(guided, target, atol=0.01, rtol=0)
    unguided = guided_euler_sample(velocity, noise, 10, target, torch.zeros(n))
    assert torch.equal(unguided, plain)


def test_flow_matching_loss_by_hand():
    x0, noise = _point()
    t = torch.tensor([0.3, 0.8])
    mask = torch.ones(2, 3, dtype=torch.bool)
    # x_t = t·noise + (1−t)·x0, target u = noise − x0: the exact field has zero loss, a zero field has mean(u²).
    exact = flow_matching_loss(lambda x, tt: (x - x0) / tt.view(-1, 1, 1), x0, mask, noise, t)
    assert exact.item() == pytest.approx(0.0, abs=1e-10)
    zero = flow_matching_loss(lambda x, tt: torch.zeros_like(x), x0, mask, noise, t)
    assert zero.item() == pytest.approx((noise - x0).pow(2).mean().item(), rel=1e-6)
    # A masked step does not count, even with NaN padding in its target.
    mask[1, 2] = False
    padded = x0.clone()
    padded[1, 2] = float("nan")
    masked = flow_matching_loss(lambda x, tt: torch.zeros_like(x), padded, mask, noise, t)
    assert masked.item() == pytest.approx((noise - x0).pow(2).mean(-1)[mask].mean().item(), rel=1e-6)


def test_sample_time_is_pi0s_beta():
    t = sample_time(20000, torch.Generator().manual_seed(0))
    assert 0.001 <= t.min() and t.max() <= 1.0
    assert t.mean().item() == pytest.approx(0.001 + 0.999 * 0.6, abs=0.01)  # Beta(1.5, 1) has mean 0.6
    assert (t > 0.5).float().mean().item() == pytest.approx(1 - ((0.5 - 0.001) / 0.999) ** 1.5, abs=0.01)
    torch.testing.assert_close(
        sample_time(5, torch.Generator().manual_seed(3)), sample_time(5, torch.Generator().manual_seed(3))
    )


def test_trained_expert_recovers_a_linear_flow():
    """Two contexts, each with one target chunk (a linear map of the context): the expert trained by flow matching
    integrates noise to its context's chunk."""
    torch.manual_seed(0)
    expert = FlowExpert(context_dim=8, action_dim=2, chunk_size=3, width=32, layers=1, heads=2)
    context = torch.randn(2, 1, 8)
    target = torch.einsum("bkd,nda->bna", context, torch.randn(3, 8, 2) * 0.5)
    mask = torch.ones(2, 3, dtype=torch.bool)
    opt = torch.optim.Adam(expert.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, STEPS)
    ctx, x0 = context.repeat(32, 1, 1), target.repeat(32, 1, 1)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return expert(x, t, ctx)

    for _ in range(STEPS):
        noise = torch.randn_like(x0)
        loss = flow_matching_loss(velocity, x0, mask[:1].expand(64, 3), noise, sample_time(64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        ctx = context.repeat(8, 1, 1)
        out = euler_sample(velocity, torch.randn(16, 3, 2), 10)
    err = (out - target.repeat(8, 1, 1)).abs()
    # Typical error a few hundredths on targets of order 1; an unlucky noise draw lands a little further off.
    assert err.mean() < 0.05 and err.max() < 0.4, (err.mean(), err.max())
    own = (out - target.repeat(8, 1, 1)).norm(dim=(1, 2))
    swapped = (out - target.flip(0).repeat(8, 1, 1)).norm(dim=(1, 2))
    assert (own < 0.25 * swapped).all()  # each sample is its own context's chunk, not the other one


def _cfg(path, family: str = "llava", **flow) -> ModelConfig:
    cfg = ModelConfig(
        backbone=BackboneConfig(family=family, pretrained=str(path)),
        action_space="flow",
        flow=FlowConfig(**{**TINY_FLOW.__dict__, **flow}),
        latent_num=2,
    )
    cfg.validate()
    return cfg


def test_flow_config_is_checked():
    with pytest.raises(ConfigError, match="must divide"):
        FlowConfig(width=30, heads=4).validate()
    with pytest.raises(ConfigError, match="num_steps"):
        FlowConfig(num_steps=0).validate()
    bad = ModelConfig(backbone=BackboneConfig(pretrained="x"), action_space="flow")
    bad.head.type = "lstm"
    with pytest.raises(ConfigError, match="action_space: continuous"):
        bad.validate()


def test_loss_decreases_overfitting_one_batch(tiny_path):
    """Measured on fixed noise and times (the training loss itself is a random draw of both)."""
    torch.manual_seed(0)
    model = build_model(_cfg(tiny_path), action_dim=A, state_dim=S, chunk_size=N).train()
    batch = robot_batch(model)

    def fixed_draw_loss() -> float:
        torch.manual_seed(123)  # the same noise and t each time
        with torch.no_grad():
            return model(batch)["loss_flow"].item()

    before = fixed_draw_loss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(STEPS_OVERFIT):
        out = model(batch)
        assert set(out) == {"loss", "loss_flow", "num_tokens"}
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    after = fixed_draw_loss()
    assert after < 0.4 * before, (before, after)


@pytest.mark.parametrize("stop", [False, True])
def test_stop_gradient_blocks_the_vlm(tiny_path, stop):
    torch.manual_seed(0)
    model = build_model(_cfg(tiny_path, stop_gradient_to_vlm=stop), action_dim=A, state_dim=S, chunk_size=N).train()
    model(robot_batch(model))["loss"].backward()
    params = dict(model.named_parameters())
    assert params["action_expert.out.weight"].grad.abs().sum() > 0
    backbone = [p for n, p in params.items() if n.startswith("adapter.") and p.requires_grad]
    assert all(p.grad is not None for p in backbone)  # in the graph either way (ZeRO needs every gradient)
    vlm_grad = sum(p.grad.abs().sum().item() for p in backbone) + params["action_token"].grad.abs().sum().item()
    assert (vlm_grad == 0.0) == stop, vlm_grad


def test_predict_is_seeded_and_shaped(tiny_path):
    torch.manual_seed(0)
    model = build_model(_cfg(tiny_path), action_dim=A, state_dim=S, chunk_size=N).eval()
    obs = robot_batch(model).observation
    arm, grip = model.predict_action(obs, torch.Generator().manual_seed(7))
    again, grip_again = model.predict_action(obs, torch.Generator().manual_seed(7))
    other, _ = model.predict_action(obs, torch.Generator().manual_seed(8))
    assert arm.shape == (2, 2, N, A - 1) and grip.shape == (2, 2, N, 1)
    assert torch.equal(arm, again) and torch.equal(grip, grip_again) and not torch.equal(arm, other)
    assert set(grip.unique().tolist()) <= {0.0, 1.0}


def test_predict_with_a_guide(tiny_path):
    torch.manual_seed(0)
    model = build_model(_cfg(tiny_path), action_dim=A, state_dim=S, chunk_size=N).eval()
    obs = robot_batch(model).observation
    plain, _ = model.predict_action(obs, torch.Generator().manual_seed(7))
    target = torch.full((N, A), 0.5)
    unweighted, _ = model.predict_action(obs, torch.Generator().manual_seed(7), (target, torch.zeros(N)))
    guided, _ = model.predict_action(obs, torch.Generator().manual_seed(7), (target, inpainting_weights(N, N, 2)))
    assert torch.equal(unweighted, plain) and not torch.equal(guided, plain)
    held = lambda arm: (arm[..., :2, :] - 0.5).abs().mean()  # noqa: E731 - the two held rows' distance to target
    assert held(guided) < held(plain)
    continuous = build_model(
        ModelConfig(backbone=BackboneConfig(pretrained=str(tiny_path)), latent_num=2), action_dim=A, state_dim=S,
        chunk_size=N,
    ).eval()  # fmt: skip
    with pytest.raises(ValueError, match="needs model.action_space: flow"):
        continuous.predict_action(robot_batch(continuous).observation, None, (target, torch.ones(N)))


@pytest.fixture(scope="module")
def family_paths(tiny_path, tmp_path_factory):
    """Tiny checkpoints of three decoder kinds: LLaVA (Llama), Qwen2-VL (M-RoPE), PaliGemma (Gemma, prefix-LM)."""
    paths = {"llava": tiny_path}
    for family in ("qwen2_vl", "paligemma"):
        paths[family] = tmp_path_factory.mktemp(f"tiny_{family}")
        build_tiny_backbone(family, TinyBackboneConfig(), paths[family], seed=0)
    return paths


@pytest.mark.parametrize("family", ["llava", "qwen2_vl", "paligemma"])
@pytest.mark.parametrize("stop", [False, True])
def test_families_train_robot_and_vl(family_paths, family, stop):
    path = family_paths[family]
    torch.manual_seed(0)
    model = build_model(_cfg(path, family, stop_gradient_to_vlm=stop), action_dim=A, state_dim=S, chunk_size=N)
    model.train()
    robot, vl = model(robot_batch(model)), model(vl_batch(model))
    assert torch.isfinite(robot["loss_flow"]) and torch.isfinite(vl["loss_vl"])
    (robot["loss"] + vl["loss"]).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient (ZeRO needs the same gradient set on every rank): {missing[:5]}"
    assert any(p.grad.abs().sum() > 0 for p in model.adapter.decoder_layers.parameters())  # VL trains the VLM


@pytest.mark.parametrize("history", ["pre", "video"])
def test_history_types_train_and_predict(tiny_path, history):
    """`pre`: one chunk per frame from one interleaved sequence; `video`: one chunk, the last frame's."""
    cfg = _cfg(tiny_path)
    cfg.history_type = history
    torch.manual_seed(0)
    model = build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()
    batch = robot_batch(model)
    out = model(batch)
    out["loss"].backward()
    assert torch.isfinite(out["loss_flow"]) and model.action_expert.out.weight.grad.abs().sum() > 0
    arm, grip = model.eval().predict_action(batch.observation, torch.Generator().manual_seed(0))
    frames = 2 if history == "pre" else 1
    assert arm.shape == (2, frames, N, A - 1) and grip.shape == (2, frames, N, 1) and torch.isfinite(arm).all()
