"""History modelling: `post` with lstm/gpt heads, `pre` (interleaved frames), `video` (one action slot at the end).

Forward/backward per history x head x action space, sequence layouts, causality over frames, head
memory (stepwise inference equals the windowed forward; reset starts a fresh episode) and the Policy path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.model.batches import tokenize, vl_batch
from vla_scale.config.schema import ActionHeadConfig, BackboneConfig, ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.normalize import Normalizer
from vla_scale.data.observation import Observation
from vla_scale.model import RoboVLM, build_model
from vla_scale.policy import Policy

B, T, N, A, S = 2, 3, 2, 4, 8
N_IMAGE, LATENT = 16, 2
TEXTS = ["pick up the red block and put it in the blue bowl", "open the drawer"]
COMBOS = [  # (history_type, head, action_space): every combination the config accepts
    ("post", "mlp", "continuous"),
    ("post", "lstm", "continuous"),
    ("post", "gpt", "continuous"),
    ("pre", "mlp", "continuous"),
    ("video", "mlp", "continuous"),
    ("pre", "mlp", "discrete"),
    ("video", "mlp", "discrete"),
]


def make(tiny_path, history: str = "post", head: str = "mlp", space: str = "continuous", **kw) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=False)
    head_cfg = ActionHeadConfig(type=head, hidden_size=32, num_layers=2, num_heads=4, max_history=T)
    kw.setdefault("use_state", True)
    cfg = ModelConfig(
        backbone=backbone, history_type=history, action_space=space, latent_num=LATENT, head=head_cfg, **kw
    )
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()


def make_batch(model: RoboVLM, frames: int = T, seed: int = 0, extra_pad: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids, mask = tokenize(model, TEXTS, extra_pad)
    action = torch.rand(B, frames, N, A, generator=g) * 1.8 - 0.9
    action[..., -1] = (torch.rand(B, frames, N, generator=g) > 0.5).float()
    action_mask = torch.ones(B, frames, N, dtype=torch.bool)
    action_mask[0, -1, -1] = False
    return Batch(
        data_source="robot",
        images=torch.randint(0, 256, (B, frames, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.randn(B, frames, S, generator=g),
        action=action,
        action_mask=action_mask,
    )


def predict(model: RoboVLM, batch: Batch) -> torch.Tensor:
    """Arm chunks and gripper probabilities in one tensor `[B, T', N, A]` (discrete: decoded bins)."""
    arm, gripper = model.predict_action(batch.observation)
    return torch.cat([arm, gripper], dim=-1)


def window(batch: Batch, start: int, stop: int) -> Batch:
    """Frames start..stop-1 of every field with a frame axis."""
    cut = {k: getattr(batch, k)[:, start:stop] for k in ("images", "state", "action", "action_mask")}
    return Batch(
        data_source="robot", text_ids=batch.text_ids, text_mask=batch.text_mask, text_labels=batch.text_labels, **cut
    )


@pytest.mark.parametrize("history, head, space", COMBOS)
def test_forward_backward_shapes_and_gradients(tiny_path, history, head, space):
    model = make(tiny_path, history, head, space)
    batch = make_batch(model)
    out = model(batch)
    n_text = int(batch.text_mask.sum())
    per_frame = N_IMAGE + 1 + (LATENT if space == "continuous" else N * A)  # image, state, action slot
    if history == "post":
        expected = T * (n_text + B * (1 + per_frame + 1))  # + BOS and EOS per frame
    elif history == "pre":
        expected = n_text + B * (1 + T * per_frame + (space == "continuous"))  # EOS after learned tokens only
    else:
        expected = n_text + B * (1 + T * (N_IMAGE + 1) + (per_frame - N_IMAGE - 1) + (space == "continuous"))
    assert out.pop("num_tokens").item() == expected
    assert all(v.dim() == 0 and torch.isfinite(v) for v in out.values())
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    frames = 1 if history == "video" else T
    model.eval()
    assert predict(model, batch).shape == (B, frames, N, A)
    if space == "discrete":
        assert model.decode_action_ids(batch.observation).shape == (B, frames, N, A)


@pytest.mark.parametrize("head", ["lstm", "gpt"])
def test_history_heads_get_gradients_on_vl_batches(tiny_path, head):
    """The idle head is touched on VL batches (ZeRO needs the same gradient set on every rank)."""
    model = make(tiny_path, "post", head)
    model(vl_batch(model))["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


@pytest.mark.parametrize("instruction_first", [False, True])
def test_pre_layout_interleaves_frames_with_their_action_tokens(tiny_path, instruction_first):
    model = make(tiny_path, "pre", instruction_first=instruction_first)
    ids, mask = tokenize(model, TEXTS)  # sample 1 is right-padded
    d = model.adapter.hidden_size
    images = torch.randn(B, T, N_IMAGE, d)
    states = torch.randn(B, T, d)
    keep = model.sequences.text_keep(ids, mask, strip_eos=True)
    fused = model.sequences.fuse(
        images,
        ids,
        keep,
        n_action=LATENT,
        action_token=model.action_token,
        append_eos=True,
        state_tokens=states,
        text_first=instruction_first,
    )
    frame_len = N_IMAGE + 1 + LATENT
    for i in range(B):
        n = int(mask[i].sum())
        first_image = 1 + (n if instruction_first else 0)
        for f in range(T):
            start = first_image + f * frame_len + (0 if instruction_first or f == 0 else n)
            torch.testing.assert_close(fused.embeds[i, start : start + N_IMAGE], images[i, f])
            torch.testing.assert_close(fused.embeds[i, start + N_IMAGE], states[i, f])
            act = start + N_IMAGE + 1 + (n if f == 0 and not instruction_first else 0)
            assert fused.action_mask[i, act : act + LATENT].all()
        text_at = 1 if instruction_first else 1 + N_IMAGE + 1
        torch.testing.assert_close(fused.embeds[i, text_at : text_at + n], model.adapter.embed_tokens(ids[i, :n]))
        length = 1 + n + T * frame_len + 1
        assert fused.attention_mask[i].sum() == length and fused.attention_mask[i, :length].all()
    assert fused.action_mask.sum() == B * T * LATENT
    assert (fused.labels == IGNORE_INDEX).all()


@pytest.mark.parametrize("history, head", [("pre", "mlp"), ("post", "lstm"), ("post", "gpt")])
def test_causal_over_frames(tiny_path, history, head):
    """Changing the last frame's image changes its chunk and none of the earlier frames'."""
    model = make(tiny_path, history, head).eval()
    batch = make_batch(model)
    base = predict(model, batch)
    batch.images[:, -1] = 255 - batch.images[:, -1]
    moved = predict(model, batch)
    torch.testing.assert_close(moved[:, :-1], base[:, :-1], atol=1e-5, rtol=1e-4)
    assert (moved[:, -1] - base[:, -1]).abs().max() > 1e-4
    if history == "pre":  # the whole window is one sequence: the earlier frames' states must change the last's
        batch.images[:, 0] = 255 - batch.images[:, 0]
        assert (predict(model, batch)[:, -1] - moved[:, -1]).abs().max() > 1e-4


def test_pre_discrete_is_causal_and_decoding_is_consistent_with_training(tiny_path):
    model = make(tiny_path, "pre", space="discrete").eval()
    batch = make_batch(model)
    ids, labels = model.actions.labels(batch)
    assert ids.shape == (B, T, N * A)

    def action_hidden(b: Batch) -> torch.Tensor:
        fused = model.robot_sequence(b.observation, action_ids=ids, action_labels=labels)
        hidden, _, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
        return hidden[fused.action_mask].reshape(B, T, N * A, -1)

    base = action_hidden(batch)
    changed = make_batch(model)
    changed.images[:, -1] = 255 - changed.images[:, -1]
    torch.testing.assert_close(action_hidden(changed)[:, :-1], base[:, :-1], atol=1e-5, rtol=1e-4)

    decoded = model.decode_action_ids(batch.observation)
    # Teacher-forcing the decoded ids in the training layout: each id is the argmax where training predicts it.
    flat = decoded.reshape(B, T, N * A)
    fused = model.robot_sequence(batch.observation, action_ids=flat, action_labels=flat)
    hidden, _, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=False)
    targets = fused.labels[:, 1:]
    logits = model.adapter.compute_logits(hidden[:, :-1][targets != IGNORE_INDEX]).float()
    tok = model.action_tokenizer
    assert torch.equal(logits[:, tok.first_id : tok.vocab_size].argmax(-1) + tok.first_id, flat.flatten())


def test_pre_and_video_with_one_frame_equal_post(tiny_path):
    batch = make_batch(make(tiny_path), frames=1)
    reference = predict(make(tiny_path).eval(), batch)
    for history in ("pre", "video"):
        torch.testing.assert_close(predict(make(tiny_path, history).eval(), batch), reference)


def test_pre_instruction_padding_does_not_change_predictions(tiny_path):
    model = make(tiny_path, "pre").eval()
    base = predict(model, make_batch(model))
    torch.testing.assert_close(predict(model, make_batch(model, extra_pad=4)), base, atol=1e-5, rtol=1e-4)


def test_video_supervises_only_the_last_frame(tiny_path):
    model = make(tiny_path, "video").eval()
    batch = make_batch(model)
    base = model(batch)
    earlier = make_batch(model)
    earlier.action[:, :-1] = float("nan")
    earlier.action_mask[:, :-1] = False
    for name in ("loss", "loss_arm", "loss_gripper", "acc_gripper"):
        torch.testing.assert_close(model(earlier)[name], base[name], msg=name)
    last = make_batch(model)
    last.action[:, -1, :, :-1] += 1.0
    assert (model(last)["loss_arm"] - base["loss_arm"]).abs() > 1e-3


@pytest.mark.parametrize("head", ["lstm", "gpt"])
def test_stepwise_inference_equals_windowed_forward_and_reset(tiny_path, head):
    model = make(tiny_path, "post", head).eval()
    assert model.stepwise
    episode = make_batch(model, frames=T + 2)  # runs two frames past the head's memory (max_history = T)

    def step(t: int) -> torch.Tensor:
        arm, grip = model.predict_action_step(episode.observation.frames(t, t + 1))
        return torch.cat([arm, grip], dim=-1)[:, 0]

    steps = [step(t) for t in range(T + 2)]
    windowed = predict(model, window(episode, 0, T))
    for t in range(T):  # within the window: exactly the training-time forward
        torch.testing.assert_close(steps[t], windowed[:, t], atol=1e-5, rtol=1e-4)
    for t in range(T, T + 2):  # past it: the training-time forward over the last T frames
        torch.testing.assert_close(
            steps[t], predict(model, window(episode, t - T + 1, t + 1))[:, -1], atol=1e-5, rtol=1e-4
        )
    assert (steps[1] - step(0)).abs().max() > 1e-4  # without reset, frame 0 now follows the episode's frames
    model.reset()
    torch.testing.assert_close(step(0), steps[0], atol=1e-6, rtol=1e-5)  # a fresh episode's first step


def test_stepwise_is_only_for_history_heads(tiny_path):
    model = make(tiny_path, "pre").eval()
    assert not model.stepwise
    model.reset()  # a no-op, callable on every model
    batch = make_batch(model, frames=1)
    with pytest.raises(ValueError, match="lstm or gpt"):
        model.predict_action_step(batch.observation)


@pytest.mark.parametrize("history, head", [("post", "gpt"), ("pre", "mlp")])
def test_policy_uses_head_memory_or_the_window(tiny_path, history, head):
    """Policy: one frame per step into a history head's memory, else the window; reset() starts over."""
    model = make(tiny_path, history, head)
    zeros, ones = np.zeros(A, np.float32), np.ones(A, np.float32)
    stats = {"action": {"mean": zeros, "std": ones}, "state": {"mean": np.zeros(S, np.float32), "std": np.ones(S)}}
    spec = {
        "data": {
            "window_size": T,
            "fwd_pred_next_n": N,
            "max_text_len": 32,
            "action_dim": A,
            "state_dim": S,
            "static_camera": "rgb",
            "wrist_camera": None,
        }
    }
    policy = Policy(model, Normalizer(stats), spec)
    episode = make_batch(model, frames=T + 1)
    ids = model.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"]
    frames = episode.images[0].permute(0, 2, 3, 1).numpy()
    states = episode.state[0].numpy()
    states[:, -1] = 0.0  # the policy binarises the gripper state; keep it exact
    outs = [policy.predict(frames[t], TEXTS[0], states[t]) for t in range(T + 1)]
    text_ids, text_mask = torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool)
    for t in range(T + 1):
        lo = max(0, t - T + 1)
        images, state = episode.images[:1, lo : t + 1], torch.from_numpy(states[None, lo : t + 1])
        arm, _ = model.predict_action(Observation(images, text_ids, text_mask, state=state))
        np.testing.assert_allclose(outs[t][:, :-1], arm[0, -1].numpy(), atol=1e-5)
    policy.reset()
    np.testing.assert_allclose(policy.predict(frames[0], TEXTS[0], states[0]), outs[0], atol=1e-6)


@pytest.mark.parametrize("head", ["lstm", "gpt"])
def test_history_head_gradient_checkpointing_gives_the_same_gradients(head):
    from vla_scale.config.schema import ActionHeadConfig
    from vla_scale.model.history_heads import build_action_head

    torch.manual_seed(0)
    cfg = ActionHeadConfig(type=head, hidden_size=16, num_layers=2, num_heads=2, max_history=3)
    module = build_action_head(cfg, in_dim=8, action_dim=4, chunk_size=2, latent_num=2).train()
    latents = torch.randn(2, 3, 2, 8)
    grads = []
    for recompute in (False, True):
        module.gradient_checkpointing = recompute
        module.zero_grad()
        arm, gripper = module(latents)
        (arm.square().sum() + gripper.sum()).backward()
        grads.append({n: p.grad.clone() for n, p in module.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)
