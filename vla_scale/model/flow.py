"""The flow-matching action path (`model.action_space: flow`, π0-style): loss, Euler sampler, RoboVLM glue.

Conditioning: the fused prefix is built exactly as on the continuous path (learned `action_token` slots after
each predicted frame); the LM's output states at those `latent_num` slots `[B*T', K, D]` are the context the
expert (`flow_expert.FlowExpert`, parameter name `action_expert`) cross-attends to. They already attend to every
image, state and instruction token before them, so they summarise the prefix at the cost of K keys instead of
the whole prefix; raise `model.latent_num` for a wider context.

Convention (openpi's π0): t = 1 is noise, t = 0 the chunk; x_t = t·noise + (1−t)·actions, target velocity
u = noise − actions, t = 0.999·Beta(1.5, 1) + 0.001; loss = MSE(v, u) over the action dims, averaged over
unmasked chunk steps. Inference: `num_steps` Euler steps x ← x − v/num_steps from Gaussian noise at t = 1.

Binary gripper dims (the last G of the Batch contract, targets in {0, 1}) flow with the rest; on output they
are thresholded at 0.5 and returned as hard "probabilities" 0.0 / 1.0 (as the discrete path does), so the
Policy's unnormalise path is unchanged. `model.flow.stop_gradient_to_vlm` detaches the context: the expert's
loss then trains the expert only, and the VLM (action token included) gets an exact zero gradient from robot
batches (kept in the graph for ZeRO, see zero_sync); it learns only through VL co-training or other losses.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from einops import rearrange

from vla_scale.config.schema import ModelConfig
from vla_scale.data.batch import Batch
from vla_scale.data.observation import Observation
from vla_scale.model.continuous import ContinuousActions
from vla_scale.model.sequence import chunk_targets
from vla_scale.model.zero_sync import zero_touch

if TYPE_CHECKING:
    from vla_scale.model.robovlm import RoboVLM

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [M, N, A], t [M]) -> v [M, N, A]


def sample_time(n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """π0's training times `[n]`: 0.999·Beta(1.5, 1) + 0.001, drawn by the inverse CDF (Beta(a, 1): u^(1/a)) so a
    seeded generator reproduces them."""
    u = torch.rand(n, generator=generator, device="cpu" if generator is None else generator.device)
    return (0.999 * u.pow(1.0 / 1.5) + 0.001).to(device)


def flow_matching_loss(
    velocity: Velocity, actions: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """Velocity MSE for chunks `[M, N, A]` with step mask `[M, N]`, noise like `actions` and times `[M]`: mean over
    dims, then over unmasked steps. Masked steps' targets are zeroed first so NaN padding cannot leak."""
    actions = torch.where(mask.unsqueeze(-1), actions.float(), 0.0)
    tt = t.float().view(-1, 1, 1)
    x_t = tt * noise.float() + (1 - tt) * actions
    err = (velocity(x_t, t).float() - (noise.float() - actions)).pow(2).mean(dim=-1)
    return torch.where(mask, err, 0.0).sum() / mask.sum().clamp(min=1)


def euler_sample(velocity: Velocity, noise: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Integrate dx/dt = v from t = 1 (`noise` `[M, N, A]`) to t = 0 in `num_steps` equal Euler steps."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = noise.float()
    dt = 1.0 / num_steps
    for i in range(num_steps):
        t = torch.full((x.shape[0],), 1.0 - i * dt, device=x.device)
        x = x - dt * velocity(x, t).float()
    return x


def inpainting_weights(chunk_size: int, prefix: int, frozen: int) -> torch.Tensor:
    """Real-time chunking's soft mask `[chunk_size]` (Black et al. 2025, "Real-Time Execution of Action Chunking
    Flow Policies"): 1 for the `frozen` rows that will execute before the new chunk arrives, decaying
    exponentially over the rest of the `prefix` rows the previous chunk still covers, 0 after them."""
    if not 0 <= frozen <= prefix <= chunk_size:
        raise ValueError(f"need 0 <= frozen ({frozen}) <= prefix ({prefix}) <= chunk size ({chunk_size})")
    w = torch.zeros(chunk_size)
    w[:frozen] = 1.0
    i = torch.arange(frozen, prefix, dtype=torch.float32)
    c = (prefix - i) / (prefix - frozen + 1)
    w[frozen:prefix] = c * torch.expm1(c) / math.expm1(1.0)
    return w


def guided_euler_sample(
    velocity: Velocity,
    noise: torch.Tensor,
    num_steps: int,
    target: torch.Tensor,
    weights: torch.Tensor,
    max_guidance: float = 5.0,
) -> torch.Tensor:
    """`euler_sample` with real-time chunking's inpainting: each step's velocity is corrected so the chunk it
    points to moves toward `target` `[M, N, A]` on the rows `weights` `[N]` marks (pseudo-inverse guidance: the
    vector-Jacobian product of the weighted error through the predicted chunk, scaled by
    min(max_guidance, (1 - s) / (s r_s^2)) with s = 1 - t the paper's time and r_s^2 = (1 - s)^2 / (s^2 + (1 - s)^2)).
    All-zero weights give `euler_sample` exactly."""
    if not bool(weights.any()):  # nothing to hold: plain sampling, no gradients
        return euler_sample(velocity, noise, num_steps)
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    x = noise.float()
    target = target.float().to(x.device)
    w = weights.float().to(x.device).view(1, -1, 1)
    dt = 1.0 / num_steps
    for i in range(num_steps):
        t_now = 1.0 - i * dt
        t = torch.full((x.shape[0],), t_now, device=x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            v = velocity(xg, t).float()
            predicted = xg - t_now * v  # the chunk this velocity points to (x_t = t noise + (1 - t) chunk)
            (grad,) = torch.autograd.grad(predicted, xg, grad_outputs=(target - predicted.detach()) * w)
        s = 1.0 - t_now
        r2 = (1.0 - s) ** 2 / (s**2 + (1.0 - s) ** 2)
        scale = max_guidance if s == 0.0 else min(max_guidance, (1.0 - s) / (s * r2))
        x = x.detach() - dt * (v.detach() - scale * grad)
    return x


class FlowActions(ContinuousActions):
    """Losses and predictions of the flow path; `model` is the RoboVLM holding `action_token`, `action_expert`."""

    def __init__(self, cfg: ModelConfig, action_dim: int, chunk_size: int, binary_dims: int = 1):
        super().__init__(cfg, binary_dims)
        self.action_dim = action_dim
        self.chunk_size = chunk_size

    def context(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the expert's context `[B*T', K, D]`, detached with stop_gradient_to_vlm; the same states undetached;
        attended LM positions)."""
        latents, num_tokens = self.latents(model, obs)
        states = rearrange(latents, "b t n d -> (b t) n d")
        ctx = states.detach() if self.cfg.flow.stop_gradient_to_vlm else states
        return ctx, states, num_tokens

    def losses(self, model: RoboVLM, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor, None]:
        """(loss terms `loss`, `loss_flow`, action-token states `[B*T', K, D]` for the CLIP regulariser, None)."""
        ctx, states, num_tokens = self.context(model, batch.observation)
        action, mask = chunk_targets(batch, self.cfg.history_type)
        action = rearrange(action, "b t n a -> (b t) n a")
        mask = rearrange(mask, "b t n -> (b t) n")
        noise = torch.randn(action.shape, device=action.device)
        t = sample_time(action.shape[0], device=action.device)
        loss_flow = flow_matching_loss(lambda x, tt: model.action_expert(x, tt, ctx), action, mask, noise, t)
        # lm_head is idle on robot batches; with stop-gradient the VLM is too: exact zero gradients (zero_sync).
        idle = [model.adapter.lm_head(states[:1, :1])]
        if self.cfg.flow.stop_gradient_to_vlm:
            idle.append(states)
        loss = self.cfg.loss_weights.flow * loss_flow + zero_touch(*idle)
        return {"loss": loss, "loss_flow": loss_flow, "num_tokens": num_tokens}, states, None

    def idle_outputs(self, model: RoboVLM) -> list[torch.Tensor]:
        """The expert on one zero chunk with the action token as context (VL batches), for `zero_touch`."""
        token = model.action_token.view(1, 1, -1)
        x = token.new_zeros(1, self.chunk_size, self.action_dim)
        return [model.action_expert(x, torch.full((1,), 0.5, device=x.device), token)]

    def predict(
        self,
        model: RoboVLM,
        obs: Observation,
        generator: torch.Generator | None = None,
        guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised regressed chunk `[B, T', N, A-G]`, hard gripper "probabilities" `[B, T', N, G]`), by
        `model.flow.num_steps` Euler steps from noise drawn on `generator` (CPU; None: the global RNG).
        `guide`: (normalised target chunk `[N, A]`, row weights `[N]`) for real-time chunking's inpainting
        (`guided_euler_sample`), the same target for every predicted frame."""
        ctx, _, _ = self.context(model, obs)
        shape = (ctx.shape[0], self.chunk_size, self.action_dim)
        noise = torch.randn(shape, generator=generator, device="cpu" if generator is None else generator.device)
        velocity = lambda x, t: model.action_expert(x, t, ctx)  # noqa: E731
        if guide is None:
            chunk = euler_sample(velocity, noise.to(ctx.device), self.cfg.flow.num_steps)
        else:
            target, weights = guide
            target = target.to(ctx.device).float().expand(shape)
            chunk = guided_euler_sample(velocity, noise.to(ctx.device), self.cfg.flow.num_steps, target, weights)
        chunk = rearrange(chunk, "(b t) n a -> b t n a", b=obs.batch_size)
        regressed = self.action_dim - self.binary_dims
        return chunk[..., :regressed], (chunk[..., regressed:] > 0.5).float()

    def predict_step(self, model: RoboVLM, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        raise ValueError("the flow action space has no stepwise head; use predict_action")
