"""Per-family recipes for tiny checkpoints: the family's real transformers config classes at tiny sizes.

Each builder returns (model with random weights, tokenizer, image processor); `tiny.build_tiny_backbone`
wraps them in the family's adapter and saves them. Every tokenizer is the offline byte-level BPE of
`tiny_tokenizer.py` with the family's own special tokens; every image processor is the family's PIL
variant (no torchvision needed), pinned to one `image_size` square as robot frames are used.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import (
    CLIPImageProcessorPil,
    Gemma2Config,
    GemmaConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3VisionConfig,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2TextConfig,
    Kosmos2VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMImageProcessorPil,
    SmolVLMVisionConfig,
)

from vla_scale.config.schema import TinyBackboneConfig
from vla_scale.model.backbones import idefics3
from vla_scale.model.backbones.kosmos2 import BOI, EOI
from vla_scale.model.backbones.paligemma import force_causal
from vla_scale.model.backbones.qwen2_vl import QWEN_SPECIALS
from vla_scale.model.backbones.tiny import text_config_kwargs
from vla_scale.model.backbones.tiny_tokenizer import IMAGE, build_tiny_tokenizer

TinyParts = tuple[nn.Module, Any, Any]  # (model, tokenizer, image processor)


def check_sizes(cfg: TinyBackboneConfig, image_multiple: int, why: str = "", heads: bool = True) -> None:
    """Refuse sizes the family's config classes would reject or silently truncate."""
    if cfg.image_size % image_multiple:
        what = "patch_size" if image_multiple == cfg.patch_size else f"{image_multiple // cfg.patch_size} x patch_size"
        raise ValueError(f"model.backbone.tiny.image_size must be a multiple of {what}{why}")
    if heads and cfg.hidden_size % cfg.num_heads:
        raise ValueError("model.backbone.tiny.hidden_size must be a multiple of num_heads")


def random_model(model_class: type[nn.Module], config: Any, seed: int) -> nn.Module:
    """The model with weights drawn from `seed` alone (the global RNG is left as it was), float32, eval mode."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).float().eval()


def vision_kwargs(cfg: TinyBackboneConfig) -> dict[str, int]:
    """The ViT sizes SigLIP-, CLIP- and Idefics3-style vision configs share."""
    return {
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 2 * cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": cfg.vision_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
    }


def text_kwargs(cfg: TinyBackboneConfig, tokenizer: Any, kv_heads: int) -> dict[str, Any]:
    """Llama-, Gemma- and Qwen2-style decoders: the shared text sizes plus `kv_heads` key/value heads."""
    return {**text_config_kwargs(cfg, tokenizer, max_positions=2048), "num_key_value_heads": kv_heads}


def square(cfg: TinyBackboneConfig) -> dict[str, int]:
    return {"height": cfg.image_size, "width": cfg.image_size}


def tiny_llava(cfg: TinyBackboneConfig, seed: int) -> TinyParts:
    """SigLIP + Llama LLaVA (LLaVA's `<pad>`, `<s>`, `</s>`, `<image>`; BOS prepended)."""
    tokenizer = build_tiny_tokenizer()
    check_sizes(cfg, cfg.patch_size, heads=False)
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(cfg)),
        text_config=LlamaConfig(**text_kwargs(cfg, tokenizer, kv_heads=cfg.num_heads)),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=(cfg.image_size // cfg.patch_size) ** 2,
        vision_feature_select_strategy="full",  # SigLIP has no CLS token to drop
    )
    model = random_model(LlavaForConditionalGeneration, config, seed)
    # The PIL variant saves as "SiglipImageProcessor", so either backend loads it.
    return model, tokenizer, SiglipImageProcessorPil(size=square(cfg))


def tiny_paligemma(cfg: TinyBackboneConfig, seed: int, text_family: str = "gemma") -> TinyParts:
    """SigLIP (no pooling head, like the real one) + Gemma or Gemma2, causal; BOS prepended, no EOS appended."""
    tokenizer = build_tiny_tokenizer(pad="<pad>", bos="<bos>", eos="<eos>")
    check_sizes(cfg, cfg.patch_size)
    head_dim = cfg.hidden_size // cfg.num_heads
    text = text_kwargs(cfg, tokenizer, kv_heads=1)  # multi-query attention, as in the real 2B/3B Gemma
    if text_family == "gemma2":  # Gemma2 scales queries by this instead of head_dim (default 256)
        text["query_pre_attn_scalar"] = head_dim
    text_config = {"gemma": GemmaConfig, "gemma2": Gemma2Config}[text_family](head_dim=head_dim, **text)
    config = PaliGemmaConfig(
        vision_config=SiglipVisionConfig(**vision_kwargs(cfg), vision_use_head=False),
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
        vocab_size=len(tokenizer),
        projection_dim=cfg.hidden_size,
        hidden_size=cfg.hidden_size,
    )
    model = random_model(PaliGemmaForConditionalGeneration, force_causal(config), seed)
    return model, tokenizer, SiglipImageProcessorPil(size=square(cfg))


def tiny_idefics3(
    cfg: TinyBackboneConfig, seed: int, classes: tuple[type, type, type, type], specials: dict[str, str]
) -> TinyParts:
    """Idefics3 / SmolVLM (pixel shuffle by 2); the image processor does no splitting, one `image_size` square."""
    config_class, vision_class, model_class, processor_class = classes
    scale = 2
    check_sizes(cfg, cfg.patch_size * scale, " (pixel shuffle)")
    tokenizer = build_tiny_tokenizer(**specials, extra_special_tokens=idefics3.IDEFICS3_SPECIALS)
    config = config_class(
        text_config=LlamaConfig(**text_kwargs(cfg, tokenizer, kv_heads=max(1, cfg.num_heads // 2))),
        vision_config=vision_class(**vision_kwargs(cfg)),
        image_token_id=tokenizer.convert_tokens_to_ids(idefics3.IMAGE),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
    )
    side = {"longest_edge": cfg.image_size}
    image_processor = processor_class(do_image_splitting=False, size=side, max_image_size=side)
    return random_model(model_class, config, seed), tokenizer, image_processor


def tiny_kosmos2(cfg: TinyBackboneConfig, seed: int) -> TinyParts:
    """Kosmos-2 with the real ratio of one latent query per 4 patches (256 → 64) and its `<image>`/`</image>`."""
    check_sizes(cfg, cfg.patch_size)
    tokenizer = build_tiny_tokenizer(
        pad="<pad>", bos="<s>", eos="</s>", extra_special_tokens={"boi_token": BOI, "eoi_token": EOI}
    )
    text = Kosmos2TextConfig(
        vocab_size=len(tokenizer),
        embed_dim=cfg.hidden_size,
        layers=cfg.num_layers,
        attention_heads=cfg.num_heads,
        ffn_dim=cfg.intermediate_size,
        max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    vision = Kosmos2VisionConfig(**vision_kwargs(cfg))
    n_patches = (cfg.image_size // cfg.patch_size) ** 2
    config = Kosmos2Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), latent_query_num=max(1, n_patches // 4)
    )
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": cfg.image_size}, crop_size=square(cfg))
    return random_model(Kosmos2ForConditionalGeneration, config, seed), tokenizer, image_processor


def qwen2_vision(cfg: TinyBackboneConfig) -> dict[str, Any]:
    return {
        "depth": cfg.vision_layers,
        "embed_dim": cfg.vision_hidden_size,
        "hidden_size": cfg.hidden_size,  # Qwen2-VL: the merger's output width
        "num_heads": cfg.vision_heads,
        "mlp_ratio": 2,
        "patch_size": cfg.patch_size,
    }


def qwen2_5_vision(cfg: TinyBackboneConfig) -> dict[str, Any]:
    return {
        "depth": cfg.vision_layers,
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 2 * cfg.vision_hidden_size,
        "out_hidden_size": cfg.hidden_size,  # the merger's output width
        "num_heads": cfg.vision_heads,
        "patch_size": cfg.patch_size,
        "window_size": 2 * cfg.patch_size * 2,  # 2x2 merged units per window: both attention kinds run
        "fullatt_block_indexes": [cfg.vision_layers - 1],
    }


def tiny_qwen2_vl(
    cfg: TinyBackboneConfig, seed: int, classes: tuple[type, type], vision: Callable[[TinyBackboneConfig], dict]
) -> TinyParts:
    """Qwen2(.5)-VL (2x2 merge, temporal patch 2); no BOS, nothing appended, pixel budget pinned to `image_size`^2."""
    config_class, model_class = classes
    check_sizes(cfg, 2 * cfg.patch_size, " (the 2x2 merge)", heads=False)
    head_dim = cfg.hidden_size // cfg.num_heads
    if head_dim % 2 or cfg.hidden_size % cfg.num_heads:
        raise ValueError("model.backbone.tiny.hidden_size / num_heads must be an even integer (RoPE)")
    tokenizer = build_tiny_tokenizer(
        pad="<|endoftext|>", bos=None, eos="<|im_end|>", extra_special_tokens=QWEN_SPECIALS
    )
    half = head_dim // 2  # mrope_section splits the rotary half over (t, h, w) like the real 16/24/24
    t_sec = max(1, half // 4)
    h_sec = (half - t_sec) // 2
    text = text_kwargs(cfg, tokenizer, kv_heads=max(1, cfg.num_heads // 2))
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e6,
        "mrope_section": [t_sec, h_sec, half - t_sec - h_sec],
    }
    ids = {k.removesuffix("_token") + "_token_id": tokenizer.convert_tokens_to_ids(v) for k, v in QWEN_SPECIALS.items()}
    config = config_class(text_config=text, vision_config=vision(cfg), **ids)
    pixels = cfg.image_size**2
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size, merge_size=2, temporal_patch_size=2, min_pixels=pixels, max_pixels=pixels
    )
    return random_model(model_class, config, seed), tokenizer, image_processor


TINY_BUILDERS: dict[str, Callable[[TinyBackboneConfig, int], TinyParts]] = {
    "idefics3": functools.partial(
        tiny_idefics3,
        classes=(Idefics3Config, Idefics3VisionConfig, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil),
        specials={"pad": "<|finetune_right_pad_id|>", "bos": "<|begin_of_text|>", "eos": "<end_of_utterance>"},
    ),
    "kosmos2": tiny_kosmos2,
    "llava": tiny_llava,
    "paligemma": tiny_paligemma,
    "paligemma2": functools.partial(tiny_paligemma, text_family="gemma2"),
    "qwen2_5_vl": functools.partial(
        tiny_qwen2_vl, classes=(Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration), vision=qwen2_5_vision
    ),
    "qwen2_vl": functools.partial(
        tiny_qwen2_vl, classes=(Qwen2VLConfig, Qwen2VLForConditionalGeneration), vision=qwen2_vision
    ),
    "smolvlm": functools.partial(
        tiny_idefics3,
        classes=(SmolVLMConfig, SmolVLMVisionConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil),
        specials={"pad": "<|im_end|>", "bos": "<|im_start|>", "eos": "<end_of_utterance>"},
    ),
}
