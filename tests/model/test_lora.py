"""LoRA through peft on the tiny LLaVA: injected in place, trains, and merges back to the same function."""

import pytest
import torch

from vla_scale.config.schema import LoraConfig
from vla_scale.model.backbones import load_backbone
from vla_scale.model.lora import apply_lora, base_state_dict, has_lora, merge_lora


def _lm_out(adapter, embeds):
    mask = torch.ones(embeds.shape[:2], dtype=torch.bool)
    return adapter.lm_forward(embeds, mask, return_logits=True)[1]


def test_lora_wraps_decoder_linears_trains_and_merges_exactly(tiny_path):
    adapter = load_backbone("llava", str(tiny_path))
    torch.manual_seed(0)
    embeds = torch.randn(2, 5, adapter.hidden_size)
    before = _lm_out(adapter, embeds)
    wrapped = apply_lora(adapter.decoder_layers, LoraConfig(enabled=True, r=4, alpha=8))
    assert wrapped == 7 * len(adapter.decoder_layers)  # q k v o gate up down per layer
    assert has_lora(adapter) and not has_lora(adapter.vision_module)
    # lora_B starts at zero: the wrapped model computes exactly the base function
    torch.testing.assert_close(_lm_out(adapter, embeds), before)

    lora_params = [p for n, p in adapter.named_parameters() if ".lora_" in n]
    opt = torch.optim.SGD(lora_params, lr=0.5)
    _lm_out(adapter, embeds).square().mean().backward()
    opt.step()
    tuned = _lm_out(adapter, embeds).detach()
    assert not torch.allclose(tuned, before)

    state = adapter.state_dict()
    base = base_state_dict(state)
    assert not any(".lora_" in k or ".base_layer" in k for k in base)
    assert merge_lora(adapter) == wrapped and not has_lora(adapter)
    assert set(adapter.state_dict()) == set(base)  # original parameter names are back
    torch.testing.assert_close(_lm_out(adapter, embeds), tuned, atol=1e-5, rtol=1e-5)


def test_lora_target_names_that_match_nothing_are_an_error(tiny_path):
    adapter = load_backbone("llava", str(tiny_path))
    with pytest.raises(ValueError, match="target_modules"):
        apply_lora(adapter.decoder_layers, LoraConfig(enabled=True, target_modules=["no_such_proj"]))
