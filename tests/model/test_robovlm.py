"""RoboVLM: token fusion, action-token insertion under padding, loss terms, masking, ZeRO zero-touch, overfitting."""

from __future__ import annotations

import math

import pytest
import torch

from tests.model.batches import INSTRUCTIONS, A, B, N, S, T, robot_batch, select, tokenize, vl_batch
from vla_scale.config.schema import BackboneConfig, ModelConfig
from vla_scale.data.batch import IGNORE_INDEX
from vla_scale.data.observation import Observation
from vla_scale.model import RoboVLM, build_model

N_IMAGE = 16  # 64x64 image, 16x16 patches


def make_model(tiny_path, latent_num: int = 2, checkpointing: bool = True, **cfg_kwargs) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=checkpointing)
    cfg = ModelConfig(backbone=backbone, latent_num=latent_num, **cfg_kwargs)
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()


@pytest.fixture
def model(tiny_path) -> RoboVLM:
    return make_model(tiny_path)


def test_robot_forward_returns_finite_scalar_terms(model):
    batch = robot_batch(model)
    out = model(batch)
    assert set(out) == {"loss", "loss_arm", "loss_gripper", "acc_gripper", "num_tokens"}
    # per frame: BOS + image tokens + instruction (no specials from the collate) + action tokens + EOS
    expected = T * (batch.text_mask.sum() + B * (1 + N_IMAGE + model.latent_num + 1))
    assert out.pop("num_tokens").item() == expected
    for name, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), name
    w = model.cfg.loss_weights
    torch.testing.assert_close(out["loss"], w.arm * out["loss_arm"] + w.gripper * out["loss_gripper"])
    assert 0.0 <= out["acc_gripper"].item() <= 1.0


def test_predict_action_shapes(model):
    batch = robot_batch(model)
    arm, gripper = model.predict_action(batch.observation)
    assert arm.shape == (B, T, N, A - 1) and gripper.shape == (B, T, N, 1)
    assert ((gripper >= 0) & (gripper <= 1)).all() and not arm.requires_grad


def test_fused_layout_puts_action_tokens_after_each_samples_last_real_token(model):
    ids, mask = tokenize(model, INSTRUCTIONS)  # sample 1 is much shorter: right-padded
    image_tokens = torch.zeros(2, N_IMAGE, model.adapter.hidden_size)
    keep = model.sequences.text_keep(ids, mask, strip_eos=True)
    fused = model.sequences.fuse(
        image_tokens, ids, keep, n_action=model.latent_num, action_token=model.action_token, append_eos=True
    )
    n_text = mask.sum(dim=1)
    for i in range(2):
        start = 1 + N_IMAGE + int(n_text[i])
        assert fused.action_mask[i].nonzero().flatten().tolist() == list(range(start, start + model.latent_num))
        length = start + model.latent_num + 1  # + EOS
        assert fused.attention_mask[i].tolist() == [True] * length + [False] * (fused.embeds.shape[1] - length)
        eos = model.adapter.embed_tokens(torch.tensor(model.adapter.eos_id))
        torch.testing.assert_close(fused.embeds[i, length - 1], eos)
    bos = model.adapter.embed_tokens(torch.tensor(model.adapter.bos_id))
    torch.testing.assert_close(fused.embeds[:, 0], torch.stack([bos, bos]))
    assert (fused.labels == IGNORE_INDEX).all()
    assert fused.embeds.shape[1] == 1 + N_IMAGE + int(n_text.max()) + model.latent_num + 1  # trimmed to the longest


def test_padding_does_not_change_a_samples_predictions_or_loss(tiny_path):
    model = make_model(tiny_path).eval()
    batch = robot_batch(model)
    short = select(batch, 1)  # "open the drawer" with no padding at all
    padded = robot_batch(model, extra_pad=5)  # both samples carry extra pad columns
    arm_alone, grip_alone = model.predict_action(short.observation)
    arm_batch, grip_batch = model.predict_action(batch.observation)
    arm_pad, grip_pad = model.predict_action(padded.observation)
    torch.testing.assert_close(arm_batch[1:], arm_alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grip_batch[1:], grip_alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(arm_pad, arm_batch, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grip_pad, grip_batch, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(model(select(padded, 1))["loss"], model(short)["loss"], atol=1e-5, rtol=1e-4)
    # Had the action tokens gone after the padding, the short sample would see pad embeddings first:
    wrong_mask = batch.text_mask.clone()
    wrong_mask[1] = True
    arm_wrong, _ = model.predict_action(Observation(batch.images, batch.text_ids, wrong_mask))
    assert (arm_wrong[1] - arm_alone[0]).abs().max() > 1e-3


def test_instruction_special_tokens_are_optional(tiny_path):
    """Instructions tokenized with the tokenizer's BOS, or with a trailing EOS, give the same sequence."""
    model = make_model(tiny_path).eval()
    batch = robot_batch(model)
    ids, mask = batch.text_ids, batch.text_mask
    bos_ids, bos_mask = tokenize(model, INSTRUCTIONS, specials=True)
    assert (bos_ids[:, 0] == model.adapter.bos_id).all()
    with_eos_ids = torch.cat([ids, torch.full_like(ids[:, :1], model.adapter.pad_id)], dim=1)
    with_eos_mask = torch.cat([mask, torch.zeros_like(mask[:, :1])], dim=1)
    lengths = mask.sum(dim=1)
    with_eos_ids[torch.arange(len(ids)), lengths] = model.adapter.eos_id
    with_eos_mask[torch.arange(len(ids)), lengths] = True
    reference = model.predict_action(Observation(batch.images, ids, mask))[0]
    for variant_ids, variant_mask in [(bos_ids, bos_mask), (with_eos_ids, with_eos_mask)]:
        arm = model.predict_action(Observation(batch.images, variant_ids, variant_mask))[0]
        torch.testing.assert_close(arm, reference, atol=1e-5, rtol=1e-4)


def test_masked_action_steps_do_not_affect_the_loss(model):
    batch = robot_batch(model)
    base = model(batch)
    changed = robot_batch(model)
    changed.action[0, -1, -1] = torch.tensor([float("nan")] * (A - 1) + [1.0 - changed.action[0, -1, -1, -1].item()])
    out = model(changed)
    for name in ["loss", "loss_arm", "loss_gripper", "acc_gripper"]:
        torch.testing.assert_close(out[name], base[name], msg=name)
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_huber_arm_loss(tiny_path):
    from vla_scale.config.schema import ActionHeadConfig

    mse = make_model(tiny_path)
    huber = make_model(tiny_path, head=ActionHeadConfig(arm_loss="huber"))
    batch = robot_batch(mse)
    loss_mse, loss_huber = mse(batch)["loss_arm"], huber(batch)["loss_arm"]
    assert torch.isfinite(loss_huber) and loss_huber <= 0.5 * loss_mse + 1e-6  # same weights; Huber(1) <= MSE / 2


def test_backward_reaches_action_token_head_and_lm_layers(model):
    model(robot_batch(model))["loss"].backward()
    assert model.action_token.grad.abs().sum() > 0
    for name, p in model.action_head.named_parameters():
        assert p.grad.abs().sum() > 0, name
    for i, layer in enumerate(model.adapter.decoder_layers):
        assert all(p.grad.abs().sum() > 0 for p in layer.parameters()), f"decoder layer {i}"
    assert model.adapter.projector.linear_1.weight.grad.abs().sum() > 0


def test_vl_forward_ignores_image_positions(model):
    batch = vl_batch(model)
    out = model(batch)
    assert set(out) == {"loss", "loss_vl", "num_tokens"}
    assert out["loss_vl"].dim() == 0 and torch.isfinite(out["loss_vl"]) and out["loss_vl"] > 0
    assert out["loss_vl"].item() == pytest.approx(math.log(len(model.adapter.tokenizer)), rel=0.2)  # random init

    image_tokens = model.adapter.encode_images(batch.images[:, 0])
    keep = model.sequences.text_keep(batch.text_ids, batch.text_mask, strip_eos=False)
    fused = model.sequences.fuse(image_tokens, batch.text_ids, keep, batch.text_labels)
    assert (fused.labels[:, : 1 + N_IMAGE] == IGNORE_INDEX).all()  # BOS + image positions
    assert (fused.labels != IGNORE_INDEX).sum() == (batch.text_labels != IGNORE_INDEX).sum()
    assert not fused.action_mask.any()
    # labels travel with their tokens: every labelled position holds the embedding of its label id
    labelled = fused.labels != IGNORE_INDEX
    torch.testing.assert_close(fused.embeds[labelled], model.adapter.embed_tokens(fused.labels[labelled]))

    no_labels = vl_batch(model)
    no_labels.text_labels.fill_(IGNORE_INDEX)
    assert model(no_labels)["loss_vl"].item() == 0.0


@pytest.mark.parametrize("kind", ["robot", "vl"])
def test_every_trainable_parameter_gets_a_gradient(model, kind):
    """The zero-valued touch terms keep the gradient set identical across batch kinds (ZeRO)."""
    batch = robot_batch(model) if kind == "robot" else vl_batch(model)
    model(batch)["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_touch_terms_do_not_change_the_loss_value(model):
    out = model(vl_batch(model))
    assert out["loss"].item() == model.cfg.loss_weights.vl * out["loss_vl"].item()


def test_bf16_backbone_runs_both_paths(tiny_path):
    """DeepSpeed bf16 casts the whole module; a bf16 load makes the head and action token bf16 too."""
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=False)
    model = build_model(ModelConfig(backbone=backbone), A, S, chunk_size=N, torch_dtype="bfloat16").train()
    assert model.action_token.dtype == torch.bfloat16
    assert next(model.action_head.parameters()).dtype == torch.bfloat16
    for batch in [robot_batch(model), vl_batch(model)]:
        out = model(batch)
        out["loss"].backward()
        out.pop("num_tokens")
        assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in out.values())


def test_wrist_images_add_tokens(model):
    batch = robot_batch(model)
    batch.wrist_images = batch.images.flip(-1)
    out = model(batch)
    assert torch.isfinite(out["loss"])


def test_wrong_chunk_or_source_is_a_clear_error(model):
    batch = robot_batch(model)
    batch.action = batch.action[:, :, :2]
    with pytest.raises(ValueError, match="fwd_pred_next_n"):
        model(batch)
    batch = robot_batch(model)
    batch.data_source = "sim"
    with pytest.raises(ValueError, match="data_source"):
        model(batch)


def test_overfits_one_robot_batch(tiny_path):
    model = make_model(tiny_path, latent_num=1, checkpointing=False)
    batch = robot_batch(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    first = None
    for _ in range(30):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        first = out["loss_arm"].item() if first is None else first
    final = model(batch)["loss_arm"].item()
    assert final < 0.2 * first, (first, final)


def test_state_token_is_inserted_and_trained(tiny_path):
    """`use_state`: one token per frame after the image; predictions depend on state; its encoder learns."""
    model = make_model(tiny_path, use_state=True)
    batch = robot_batch(model)
    without = make_model(tiny_path)
    assert model(batch)["num_tokens"].item() == without(batch)["num_tokens"].item() + B * T
    arm, _ = model.predict_action(batch.observation)
    moved, _ = model.predict_action(Observation(batch.images, batch.text_ids, batch.text_mask, state=batch.state + 1.0))
    assert not torch.allclose(arm, moved)
    closed = batch.state.clone()
    closed[..., -1] = 1.0 - (closed[..., -1] > 0.5).float()  # flip the gripper bit only
    flipped, _ = model.predict_action(Observation(batch.images, batch.text_ids, batch.text_mask, state=closed))
    assert not torch.allclose(arm, flipped)
    model(batch)["loss"].backward()
    for name in ("arm.weight", "gripper.weight", "proj.weight"):
        assert getattr(model.state_encoder, name.split(".")[0]).weight.grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="use_state is on but the batch has no `state`"):
        model.predict_action(Observation(batch.images, batch.text_ids, batch.text_mask))


@pytest.mark.parametrize("kind", ["robot", "vl"])
def test_state_encoder_gets_a_gradient_on_both_batch_kinds(tiny_path, kind):
    model = make_model(tiny_path, use_state=True)
    batch = robot_batch(model) if kind == "robot" else vl_batch(model)
    model(batch)["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_instruction_first_layout_and_padding_invariance(tiny_path):
    """`instruction_first`: [BOS] text image [state] actions [EOS], compacted per sample like the default layout."""
    model = make_model(tiny_path, instruction_first=True, use_state=True)
    ids, mask = tokenize(model, INSTRUCTIONS)
    image_tokens = torch.randn(2, N_IMAGE, model.adapter.hidden_size)
    state_tokens = torch.randn(2, 1, model.adapter.hidden_size)
    keep = model.sequences.text_keep(ids, mask, strip_eos=True)
    fused = model.sequences.fuse(
        image_tokens,
        ids,
        keep,
        n_action=model.latent_num,
        action_token=model.action_token,
        append_eos=True,
        state_tokens=state_tokens,
        text_first=True,
    )
    for i in range(2):
        n = int(mask[i].sum())
        text = model.adapter.embed_tokens(ids[i, :n])
        torch.testing.assert_close(fused.embeds[i, 1 : 1 + n], text)
        torch.testing.assert_close(fused.embeds[i, 1 + n : 1 + n + N_IMAGE], image_tokens[i])
        torch.testing.assert_close(fused.embeds[i, 1 + n + N_IMAGE], state_tokens[i, 0])
        start = 1 + n + N_IMAGE + 1
        assert fused.action_mask[i].nonzero().flatten().tolist() == list(range(start, start + model.latent_num))
    batch = robot_batch(model)
    padded = robot_batch(model, extra_pad=3)
    torch.testing.assert_close(model(batch)["loss_arm"], model(padded)["loss_arm"], rtol=1e-5, atol=1e-6)
