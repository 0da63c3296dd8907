"""accelerate's big-model utilities in `Policy.from_pretrained`: the backbone built on the meta device when the
export's weights replace it anyway, and `device_map` (the backbone placed by accelerate through transformers'
`from_pretrained`, the heads on `device`), each giving the same weights and actions as a materialised load.

Only CPU placements are tested here (no GPU): everything on the CPU ({"": "cpu"}, "auto"), and the language model
offloaded to disk, where accelerate's hooks load its weights in at every forward: the path a backbone larger than
memory takes. Splits over several GPUs are not exercised.
"""

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.serve.conftest import write_untrained_export
from vla_scale.policy import Policy


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory, toy_data: Path) -> Path:
    return write_untrained_export(tmp_path_factory.mktemp("device_map") / "policy", toy_data / "robot")


def actions(policy: Policy) -> np.ndarray:
    """Two steps of one episode (the second sees the first in its history) from fixed inputs."""
    rng = np.random.default_rng(0)
    policy.reset(seed=0)
    out = []
    for _ in range(2):
        image = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
        out.append(policy.predict(image, "pick up the red block", rng.standard_normal(policy.state_dim), seed=0))
    return np.stack(out)


DISK_MAP = {"model.language_model": "disk", "model.vision_tower": "cpu", "model.multi_modal_projector": "cpu"}


@pytest.mark.parametrize("device_map", [{"": "cpu"}, "auto", DISK_MAP], ids=["cpu", "auto", "lm_on_disk"])
def test_device_map_predicts_as_the_plain_load(export, tmp_path, device_map):
    torch.set_num_threads(1)
    want = actions(Policy.from_pretrained(export, device="cpu"))
    if device_map is DISK_MAP:
        device_map = {**DISK_MAP, "lm_head": "cpu"}
    policy = Policy.from_pretrained(export, device="cpu", device_map=device_map, offload_folder=tmp_path / "offload")
    # a single-device map is a plain load onto that device (transformers then records no hf_device_map)
    placed = getattr(policy.model.adapter.model, "hf_device_map", {"": "cpu"})
    if "model.language_model" in device_map:
        assert placed["model.language_model"] == "disk", placed
        # offloaded: the decoder's weights are not in memory; accelerate's hooks read them in at each forward
        # (from the export's safetensors file itself, so nothing needs to be written to the offload folder)
        assert all(p.device.type == "meta" for p in policy.model.adapter.language_model.parameters())
    else:
        assert set(placed.values()) == {"cpu"}, placed
    np.testing.assert_allclose(actions(policy), want, rtol=1e-5, atol=1e-6)


def test_device_map_refuses_an_export_with_separate_lora_adapters(tmp_path, toy_data):
    """Unmerged LoRA: backbone/ holds base weights only and the adapters would have to be loaded into offloaded
    layers, so it is refused with a clear error instead of predicting with the base weights."""
    lora = write_untrained_export(tmp_path / "policy", toy_data / "robot", overrides=("model.lora.enabled=true",))
    Policy.from_pretrained(lora, device="cpu")  # the plain load takes it
    with pytest.raises(ValueError, match="LoRA merged"):
        Policy.from_pretrained(lora, device="cpu", device_map="auto")


def test_meta_device_build_equals_the_materialised_build_after_loading(export, tmp_path):
    """The plain load builds the backbone with `init_empty_weights` and assigns model.safetensors: it never reads
    backbone/'s weights (here deleted), and ends with the same parameters, buffers and actions as the materialised
    build (backbone loaded from backbone/, the rest loaded over it: the `device_map={"": "cpu"}` path)."""
    torch.set_num_threads(1)
    no_weights = Path(shutil.copytree(export, tmp_path / "policy"))
    deleted = list((no_weights / "backbone").glob("*.safetensors"))
    assert deleted
    for f in deleted:
        f.unlink()
    empty = Policy.from_pretrained(no_weights, device="cpu")
    materialised = Policy.from_pretrained(export, device="cpu", device_map={"": "cpu"})

    saved = load_file(str(export / "model.safetensors"))
    got = empty.model.state_dict()
    assert got.keys() == saved.keys()
    for key, value in saved.items():
        assert got[key].device.type == "cpu" and torch.equal(got[key], value), key
    want_buffers = dict(materialised.model.named_buffers())  # non-persistent ones too (computed, not loaded)
    got_buffers = dict(empty.model.named_buffers())
    assert got_buffers.keys() == want_buffers.keys()
    for key, value in want_buffers.items():
        assert torch.equal(got_buffers[key], value), key
    backbone = empty.model.adapter.model
    if backbone.config.get_text_config().tie_word_embeddings:  # tied again after the assignment
        assert backbone.get_output_embeddings().weight is backbone.get_input_embeddings().weight
    np.testing.assert_array_equal(actions(empty), actions(materialised))
