"""A multi-turn LLaVA conversation through RoboVLM: the VL loss is next-token CE over assistant tokens only."""

import numpy as np
import torch
import torch.nn.functional as F

from vla_scale.config.schema import BackboneConfig, ModelConfig
from vla_scale.data.batch import IGNORE_INDEX
from vla_scale.data.collate import collate_vl
from vla_scale.data.format import VLSample
from vla_scale.model import build_model

TURNS = [
    {"from": "human", "value": "<image>\nWhat is on the table?"},
    {"from": "gpt", "value": "A red cube."},
    {"from": "human", "value": "Where is it?"},
    {"from": "gpt", "value": "On the left."},
]


def test_vl_loss_counts_exactly_the_assistant_tokens(tiny_path):
    cfg = ModelConfig(backbone=BackboneConfig(family="llava", pretrained=str(tiny_path), gradient_checkpointing=False))
    model = build_model(cfg, action_dim=4, state_dim=4)
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    samples = [
        VLSample(key="a", image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), conversations=TURNS),
        VLSample(key="b", image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), conversations=TURNS[:2]),
    ]
    batch = collate_vl(samples, tok, max_text_len=200)
    out = model(batch)
    # Reference: the same fused sequence, cross-entropy by hand over labelled positions only.
    image_tokens = model.adapter.encode_images(batch.images[:, 0])
    keep = model.sequences.text_keep(batch.text_ids, batch.text_mask.bool(), strip_eos=False)
    fused = model.sequences.fuse(image_tokens, batch.text_ids, keep, batch.text_labels)
    _, logits, _ = model.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=True)
    labels = fused.labels[:, 1:]
    mask = labels != IGNORE_INDEX
    assert int(mask.sum()) == int((batch.text_labels != IGNORE_INDEX).sum())
    ref = F.cross_entropy(logits[:, :-1][mask].float(), labels[mask])
    torch.testing.assert_close(out["loss_vl"], ref, atol=1e-5, rtol=1e-5)
