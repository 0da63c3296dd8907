"""`model.discrete.tokenizer: fast` on the tiny LLaVA: variable-length FAST ids + EOS in the action slot (padding
neither attended nor supervised), EOS-stopped greedy decoding (cached == uncached), overfitting, config errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.model.batches import DISCRETE_A, DISCRETE_N, discrete_batch
from vla_scale.config import ConfigError, load_config
from vla_scale.config.schema import BackboneConfig, DiscreteActionConfig, ModelConfig, TinyBackboneConfig
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.backbones import build_tiny_backbone
from vla_scale.model.fast_tokenizer import FastTokenizer

ROOT = Path(__file__).resolve().parents[2]
N, A, S = DISCRETE_N, DISCRETE_A, 8
N_IMAGE = 16
VOCAB = 512  # the tiny tokenizer


@pytest.fixture(scope="module")
def fast_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FAST tokenizer fitted on chunks like `discrete_batch`'s: arm dims in [-0.9, 0.9], a binary gripper."""
    rng = np.random.default_rng(0)
    chunks = rng.uniform(-0.9, 0.9, (2000, N, A)).astype(np.float32)
    chunks[..., -1] = rng.integers(0, 2, (2000, N))
    tok = FastTokenizer.fit(chunks, binary_dims=1, scale=10.0, vocab_size=96)
    return tok.save(tmp_path_factory.mktemp("fast") / "fast_tokenizer.json")


def make_fast(tiny_path: Path, fast_file: Path, history_type: str = "post", family: str = "llava") -> RoboVLM:
    torch.manual_seed(0)
    backbone = BackboneConfig(family=family, pretrained=str(tiny_path), gradient_checkpointing=False)
    discrete = DiscreteActionConfig(tokenizer="fast", fast_path=str(fast_file))
    cfg = ModelConfig(backbone=backbone, action_space="discrete", discrete=discrete, history_type=history_type)
    return build_model(cfg, action_dim=A, state_dim=S, chunk_size=N).train()


def test_labels_are_fast_ids_then_padding_and_eos_follows_each_row(tiny_path: Path, fast_file: Path) -> None:
    model = make_fast(tiny_path, fast_file)
    tok, first = model.actions.fast, model.action_tokenizer.first_id
    assert first == VOCAB - tok.vocab_size and model.action_tokenizer.vocab_size == VOCAB
    batch = discrete_batch(model, extra_pad=2)
    batch.action[0, 0, 1] = float("nan")  # masked step (sample 0's last): encoded holding step 0
    ids, labels = model.actions.labels(batch)
    held = batch.action[0:1, 0].clone()
    held[:, 1] = held[:, 0]
    expected = [tok.encode(held.numpy())[0], tok.encode(batch.action[1:2, 0].numpy())[0]]
    assert ids.shape == (2, max(map(len, expected)))
    for i, row in enumerate(expected):
        k = len(row)
        assert ids[i, :k].tolist() == [t + first for t in row] and (ids[i, k:] == -1).all()
        assert labels[i, :k].tolist() == ids[i, :k].tolist() and (labels[i, k:] == IGNORE_INDEX).all()
    slot = {"action_ids": ids, "action_labels": labels, "append_eos": True, "eos_label": True}
    fused = model.robot_sequence(batch.observation, **slot)
    eos = model.adapter.eos_id
    for i, n_text in enumerate(batch.text_mask.sum(dim=1).tolist()):
        start, k = 1 + N_IMAGE + n_text, len(expected[i])
        want = [IGNORE_INDEX] * start + ids[i, :k].tolist() + [eos]
        want += [IGNORE_INDEX] * (fused.labels.shape[1] - len(want))
        assert fused.labels[i].tolist() == want  # EOS right after the row's last id, padding unlabelled
        assert fused.attention_mask[i].sum() == start + k + 1  # padding not attended
        assert fused.action_mask[i].nonzero().flatten().tolist() == list(range(start, start + k))
    out = model(batch)
    _, logits, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), fused.labels[:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out["loss_action_ce"], ce, rtol=1e-5, atol=1e-5)
    out["loss"].backward()
    assert model.adapter.lm_head.weight.grad[first:].abs().sum() > 0


def test_cached_and_uncached_decoding_agree_and_stop_at_eos(tiny_path: Path, fast_file: Path) -> None:
    model = make_fast(tiny_path, fast_file).eval()
    first, eos = model.action_tokenizer.first_id, model.adapter.eos_id
    batch = discrete_batch(model)
    head = model.adapter.lm_head.weight
    with torch.no_grad():  # spread the FAST rows so greedy ids depend on the context (random init ties them)
        head[first:] *= 30
        # EOS wins wherever row 0's third id would: rows then stop at context-dependent steps
        head[eos] = head[int(model.decode_action_ids(batch.observation)[0, 0, 2])] * 1.01
    cached = model.decode_action_ids(batch.observation)
    uncached = model.decode_action_ids(batch.observation, use_cache=False)
    assert cached.shape[:2] == (2, 1) and cached.shape[2] <= N * A and torch.equal(cached, uncached)
    assert (((cached >= first) & (cached < VOCAB)) | (cached == eos)).all()
    assert cached[0, 0, 2] == eos  # stopped early
    for row in cached.reshape(2, -1).tolist():  # once a row has emitted EOS it only repeats it
        if eos in row:
            assert set(row[row.index(eos) :]) == {eos}
    n = int(batch.text_mask[1].sum())
    alone = model.decode_action_ids(Observation(batch.images[1:], batch.text_ids[1:, :n], batch.text_mask[1:, :n]))
    k = alone.shape[-1]
    assert torch.equal(alone, cached[1:, :, :k]) and (cached[1:, :, k:] == eos).all()
    arm, gripper = model.predict_action(batch.observation)
    assert arm.shape == (2, 1, N, A - 1) and gripper.shape == (2, 1, N, 1)
    assert set(gripper.unique().tolist()) <= {0.0, 1.0}
    chunks = model.actions.fast.decode(model.actions.tokens_of(cached))
    np.testing.assert_allclose(arm.numpy(), chunks[None, :, :, :-1].reshape(arm.shape))


def test_overfits_one_batch_and_decodes_the_chunks(tiny_path: Path, fast_file: Path) -> None:
    model = make_fast(tiny_path, fast_file)
    batch = discrete_batch(model)
    batch.action_mask[:] = True
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):
        out = model(batch)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss_action_ce"].item())
    assert losses[-1] < 0.1 * losses[0], losses
    arm, gripper = model.eval().predict_action(batch.observation)
    assert model.actions.fast.bad_length == 0
    assert (arm - batch.action[..., :-1]).abs().max() <= model.actions.fast.error_bound + 1e-5
    assert torch.equal(gripper, batch.action[..., -1:])


def test_model_refuses_a_tokenizer_for_other_chunks(tiny_path: Path, tmp_path: Path) -> None:
    chunks = np.zeros((4, 3, A), np.float32)
    path = FastTokenizer.fit(chunks, binary_dims=1, vocab_size=32).save(tmp_path / "fast_tokenizer.json")
    with pytest.raises(ValueError, match=r"fitted on chunks of 3 steps x 4 dims.*predicts 2 x 4.*fit-fast"):
        make_fast(tiny_path, path)
    wide = np.random.default_rng(0).uniform(-40, 40, (50, N, A))  # ~1100 integers: more than the LM's 512 ids
    wide[..., -1] = 0
    big = FastTokenizer.fit(wide, binary_dims=1, vocab_size=256)
    with pytest.raises(ValueError, match=r"has \d+ tokens, not fewer than the LM's 512-token.*--vocab-size"):
        make_fast(tiny_path, big.save(tmp_path / "big.json"))


@pytest.mark.parametrize(("family", "history", "frames"), [("qwen2_5_vl", "video", 2), ("kosmos2", "post", 2)])
def test_other_families_train_and_decode_fast_tokens(
    tmp_path: Path, fast_file: Path, family: str, history: str, frames: int
) -> None:
    """Multimodal RoPE (Qwen2.5-VL, `video`: one slot after two frames) and Kosmos-2 (`post`: a slot per frame)."""
    build_tiny_backbone(family, TinyBackboneConfig(num_layers=1, vision_layers=1), tmp_path / family, seed=0)
    model = make_fast(tmp_path / family, fast_file, history, family)
    g = torch.Generator().manual_seed(0)
    texts = ["pick up the red cube", "push the blue block to the left side"]
    rows = [model.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    action = torch.rand(2, frames, N, A, generator=g) * 1.8 - 0.9
    action[..., -1] = (action[..., -1] > 0).float()
    batch = Batch(
        data_source="robot",
        images=torch.randint(0, 256, (2, frames, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=torch.tensor([[True] * len(r) + [False] * (width - len(r)) for r in rows]),
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        action=action,
        action_mask=torch.ones(2, frames, N, dtype=torch.bool),
    )
    out = model(batch)
    assert torch.isfinite(out["loss_action_ce"]) and out["loss_action_ce"] > 0
    out["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []
    model.eval()
    with torch.no_grad():
        model.adapter.lm_head.weight[model.action_tokenizer.first_id :] *= 30
    cached = model.decode_action_ids(batch.observation)
    assert cached.shape[:2] == (2, 1 if history == "video" else frames)
    assert torch.equal(cached, model.decode_action_ids(batch.observation, use_cache=False))
    arm, gripper = model.predict_action(batch.observation)
    assert arm.shape == (*cached.shape[:2], N, A - 1) and gripper.shape == (*cached.shape[:2], N, 1)


FAST = ["model.action_space=discrete", "model.discrete.tokenizer=fast"]


def test_config_errors_name_the_key(fast_file: Path, tmp_path: Path) -> None:
    debug = ROOT / "configs/debug.yaml"
    missing = tmp_path / "nowhere" / "fast_tokenizer.json"
    # The file is checked for a job (like its datasets), not when a config is merely loaded.
    cfg = load_config(debug, [*FAST, f"model.discrete.fast_path={missing}"])
    with pytest.raises(ConfigError, match=r"model\.discrete\.fast_path \(.*nowhere.*\) does not exist.*fit-fast"):
        cfg.validate(world_size=2)
    cfg = load_config(debug, [*FAST, "data.sources.0.path=data/synth/robot"])  # the default: beside the dataset
    with pytest.raises(ConfigError, match=r"data/synth/robot/fast_tokenizer\.json.*does not exist"):
        cfg.validate(world_size=2)
    cfg = load_config(debug, [*FAST, f"model.discrete.fast_path={fast_file}", "data.fwd_pred_next_n=4"])
    with pytest.raises(ConfigError, match=r"fitted on chunks of 2 steps.*fwd_pred_next_n is 4"):
        cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match=r"model\.discrete\.tokenizer: fast.*history_type: pre"):
        load_config(debug, [*FAST, f"model.discrete.fast_path={fast_file}", "model.history_type=pre"])
    with pytest.raises(ConfigError, match=r"model\.discrete\.tokenizer: fast.*action_space: discrete"):
        load_config(debug, ["model.discrete.tokenizer=fast", f"model.discrete.fast_path={fast_file}"])
    with pytest.raises(ConfigError, match=r"model\.discrete\.tokenizer.*'bins'.*'fast'"):
        load_config(debug, ["model.action_space=discrete", "model.discrete.tokenizer=fats"])
    cfg = load_config(debug, [*FAST, f"model.discrete.fast_path={fast_file}"])
    cfg.validate(world_size=2)
    assert cfg.model.discrete.tokenizer == "fast" and cfg.model.discrete.fast_path == str(fast_file)
