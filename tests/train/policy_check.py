"""Reference predictions built by hand from a checkpoint's model, to compare exported policies against."""

from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from vla_scale.data.format import decode_episode
from vla_scale.data.normalize import Normalizer
from vla_scale.data.observation import Observation


def first_episode(data: Path):
    sample = next(iter(wds.WebDataset(str(data / "robot" / "shard-000000.tar"), shardshuffle=False)))
    return decode_episode(sample)


def reference_actions(model, normalizer: Normalizer, frame, instruction, state, max_text_len) -> np.ndarray:
    """What the checkpoint's model predicts for one step, built by hand the way training data is."""
    ids = model.tokenizer(instruction, add_special_tokens=False)["input_ids"][:max_text_len]
    images = torch.from_numpy(np.array(frame)).permute(2, 0, 1)[None, None]
    norm_state = torch.from_numpy(normalizer.normalize_state(state))[None, None]
    obs = Observation(images, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.bool), state=norm_state)
    arm, grip = model.predict_action(obs)
    return normalizer.unnormalize_action(arm[0, 0].numpy(), grip[0, 0].numpy())
