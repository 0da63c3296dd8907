"""Batch builders shared by the model tests: right-padded text like the data collate, robot/VL/discrete batches.

A plain module (not a test file), so test files import it instead of importing each other.
"""

from __future__ import annotations

import torch

from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.model import RoboVLM

B, T, N, A, S = 2, 2, 3, 7, 8  # robot_batch: 2 samples, 2 frames, chunk of 3, 6 arm dims + gripper, 8 state dims
INSTRUCTIONS = ["pick up the red block and put it in the blue bowl", "open the drawer"]
DISCRETE_T, DISCRETE_N, DISCRETE_A = 1, 2, 4  # discrete_batch: 1 frame, chunk of 2, 3 arm dims + gripper


def tokenize(
    model: RoboVLM, texts: list[str], extra_pad: int = 0, specials: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and mask like the data collate (no special tokens unless asked), `extra_pad` more columns."""
    tok = model.adapter.tokenizer
    rows = [tok(t, add_special_tokens=specials).input_ids for t in texts]
    length = max(len(r) for r in rows) + extra_pad
    ids = torch.full((len(rows), length), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.bool)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), True
    return ids, mask


def robot_batch(model: RoboVLM, texts: list[str] = INSTRUCTIONS, seed: int = 0, extra_pad: int = 0) -> Batch:
    """A continuous robot batch (T, N, A, S above) whose sample 0 has its last step masked out."""
    g = torch.Generator().manual_seed(seed)
    b = len(texts)
    ids, mask = tokenize(model, texts, extra_pad)
    action = torch.randn(b, T, N, A, generator=g)
    action[..., -1] = (torch.rand(b, T, N, generator=g) > 0.5).float()
    action_mask = torch.ones(b, T, N, dtype=torch.bool)
    action_mask[0, -1, -1] = False  # the last step of sample 0 runs past its episode end
    return Batch(
        data_source="robot",
        images=torch.randint(0, 256, (b, T, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        state=torch.randn(b, T, S, generator=g),
        action=action,
        action_mask=action_mask,
    )


def vl_batch(model: RoboVLM, seed: int = 0) -> Batch:
    """Two one-image VL samples whose labels cover only the answers."""
    g = torch.Generator().manual_seed(seed)
    prompts = ["USER: <image>\nDescribe the image. ASSISTANT:", "Question: What color is the cup? Answer:"]
    answers = [" A red block and a robot gripper.", " It is blue."]
    ids, mask = tokenize(model, [p + a for p, a in zip(prompts, answers, strict=True)])
    labels = torch.full_like(ids, IGNORE_INDEX)
    for i, p in enumerate(prompts):
        start = len(model.adapter.tokenizer(p, add_special_tokens=False).input_ids)
        labels[i, start : int(mask[i].sum())] = ids[i, start : int(mask[i].sum())]
    images = torch.randint(0, 256, (2, 1, 3, 64, 64), dtype=torch.uint8, generator=g)
    return Batch(data_source="vl", images=images, text_ids=ids, text_mask=mask, text_labels=labels)


def select(batch: Batch, i: int) -> Batch:
    """Sample i alone, its text trimmed to its own length (no padding at all)."""
    length = int(batch.text_mask[i].sum())
    fields = {k: getattr(batch, k) for k in ["images", "state", "action", "action_mask"]}
    return Batch(
        data_source=batch.data_source,
        text_ids=batch.text_ids[i : i + 1, :length],
        text_mask=batch.text_mask[i : i + 1, :length],
        text_labels=batch.text_labels[i : i + 1, :length],
        **{k: v[i : i + 1] for k, v in fields.items()},
    )


def discrete_batch(model: RoboVLM, seed: int = 0, extra_pad: int = 0) -> Batch:
    """A stateless robot batch in [-0.9, 0.9] (DISCRETE_* shape) for discrete-action models; sample 0's last step
    is masked out."""
    g = torch.Generator().manual_seed(seed)
    b, t, n, a = len(INSTRUCTIONS), DISCRETE_T, DISCRETE_N, DISCRETE_A
    ids, mask = tokenize(model, INSTRUCTIONS, extra_pad)
    action = torch.rand(b, t, n, a, generator=g) * 1.8 - 0.9
    action[..., -1] = (torch.rand(b, t, n, generator=g) > 0.5).float()
    action_mask = torch.ones(b, t, n, dtype=torch.bool)
    action_mask[0, -1, -1] = False
    return Batch(
        data_source="robot",
        images=torch.randint(0, 256, (b, t, 3, 64, 64), dtype=torch.uint8, generator=g),
        text_ids=ids,
        text_mask=mask,
        text_labels=torch.full_like(ids, IGNORE_INDEX),
        action=action,
        action_mask=action_mask,
    )
