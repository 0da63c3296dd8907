"""The model follows the dataset's declared space: 0, 1 or 2 binary grippers in the heads, losses, tokens and state."""

from __future__ import annotations

import pytest
import torch

from tests.model.batches import INSTRUCTIONS, tokenize
from vla_scale.config.schema import ActionHeadConfig, BackboneConfig, ModelConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.state_encoder import StateEncoder

T, N, A, S = 2, 3, 14, 8  # a bimanual action: 12 regressed dims + up to 2 binary grippers


def make_model(tiny_path, binary: int, binary_state: int, **cfg) -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family="llava", pretrained=str(tiny_path))
    model_cfg = ModelConfig(backbone=backbone, use_state=True, **cfg)
    return build_model(
        model_cfg, A, S, chunk_size=N, binary_dims=binary, binary_state_dims=binary_state, load_clip=False
    ).train()


def batch_for(model: RoboVLM, binary: int, seed: int = 0) -> Batch:
    """Regressed dims first, then `binary` 0/1 grippers (the Batch contract); same for the state."""
    g = torch.Generator().manual_seed(seed)
    ids, mask = tokenize(model, INSTRUCTIONS)
    b = len(INSTRUCTIONS)
    action = torch.rand(b, T, N, A, generator=g) * 1.6 - 0.8
    action[..., A - binary :] = (torch.rand(b, T, N, binary, generator=g) > 0.5).float()
    state = torch.randn(b, T, S, generator=g)
    state[..., S - model.binary_state_dims :] = (torch.rand(b, T, model.binary_state_dims, generator=g) > 0.5).float()
    return Batch(
        data_source="robot",
        images=torch.randint(0, 256, (b, T, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=state,
        action=action,
        action_mask=torch.ones(b, T, N, dtype=torch.bool),
    )


@pytest.mark.parametrize("head", ["mlp", "lstm"])
@pytest.mark.parametrize("binary", [0, 2])
def test_continuous_losses_and_predictions_follow_the_number_of_binary_grippers(tiny_path, binary: int, head: str):
    cfg = {"head": ActionHeadConfig(type=head, max_history=T)} if head != "mlp" else {}
    model = make_model(tiny_path, binary, binary_state=0 if binary == 0 else 2, **cfg)
    batch = batch_for(model, binary)
    out = model(batch)
    gripper_terms = {"loss_gripper", "acc_gripper"}
    assert gripper_terms <= set(out) if binary else not gripper_terms & set(out)
    w = model.cfg.loss_weights
    expected = w.arm * out["loss_arm"] + (w.gripper * out["loss_gripper"] if binary else 0.0)
    torch.testing.assert_close(out["loss"], expected)
    out["loss"].backward()
    assert model.action_head.arm.weight.grad.abs().sum() > 0
    assert (model.action_head.gripper is None) == (binary == 0)
    if binary:
        assert model.action_head.gripper.weight.grad.abs().sum() > 0
        assert model.state_encoder.gripper.weight.shape[0] == 4  # two values for each of 2 binary state dims
    arm, gripper = model.eval().predict_action(batch.observation)
    assert arm.shape == (2, T, N, A - binary) and gripper.shape == (2, T, N, binary)


def test_the_gripper_loss_sees_each_gripper(tiny_path):
    """Flipping only the second gripper's targets changes loss_gripper; flipping both turns acc into 1 - acc."""
    model = make_model(tiny_path, binary=2, binary_state=1)
    batch = batch_for(model, 2)
    before = model(batch)
    batch.action[..., -1] = 1 - batch.action[..., -1]
    after = model(batch)
    assert not torch.equal(before["loss_gripper"], after["loss_gripper"])
    torch.testing.assert_close(before["loss_arm"], after["loss_arm"])
    batch.action[..., -2] = 1 - batch.action[..., -2]
    both = model(batch)
    torch.testing.assert_close(before["acc_gripper"] + both["acc_gripper"], torch.tensor(1.0))


def test_discrete_bins_every_dim_and_decodes_the_binary_ones_as_0_or_1():
    tok = ActionTokenizer(1000, n_bin=256)
    action = torch.tensor([[0.3, -0.7, 0.1, 1.0, 0.0]])  # 3 regressed dims, 2 binary grippers
    ids = tok.encode_chunk(action, binary_dims=2)
    assert ids.shape == (1, 5) and ids[0, 3] == tok.vocab_size - 1 and ids[0, 4] == tok.first_id
    arm, gripper = tok.decode_chunk(ids, binary_dims=2)
    torch.testing.assert_close(arm, action[:, :3], atol=tok.bin_width, rtol=0)
    assert gripper.tolist() == [[1.0, 0.0]]
    arm, gripper = tok.decode_chunk(tok.encode_chunk(action, binary_dims=0), binary_dims=0)
    assert arm.shape == (1, 5) and gripper.shape == (1, 0)


def test_discrete_model_with_no_binary_gripper_predicts_every_dim_as_a_bin(tiny_path):
    model = make_model(tiny_path, binary=0, binary_state=0, action_space="discrete")
    out = model(batch_for(model, 0))
    assert "loss_action_ce" in out and torch.isfinite(out["loss"])
    arm, gripper = model.eval().predict_action(batch_for(model, 0).observation.frames(0, 1))
    assert arm.shape[-1] == A and gripper.shape[-1] == 0


@pytest.mark.parametrize("binary", [0, 1, 2])
def test_state_encoder_embeds_each_binary_dim(binary: int):
    torch.manual_seed(0)
    enc = StateEncoder(6, 16, binary_dims=binary)
    state = torch.zeros(3, 6)
    base = enc(state)
    assert base.shape == (3, 16)
    for j in range(binary):  # flipping binary dim j changes the token; its regressed neighbours are untouched
        flipped = state.clone()
        flipped[:, 6 - binary + j] = 1.0
        assert not torch.allclose(enc(flipped), base)
    with pytest.raises(ValueError, match="no regressed dimension"):
        StateEncoder(2, 16, binary_dims=2)
