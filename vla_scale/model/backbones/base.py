"""The backbone adapter contract and the registry of VLM families.

RoboVLM talks to a pretrained VLM only through `BackboneAdapter`, so adding a family
means writing one adapter (token embedding, image encoding into the LM's embedding
space, an `inputs_embeds` LM forward, the decoder layers) and registering it by name.
Every adapter loads real checkpoints and its tiny test checkpoints through the same
`from_pretrained` path.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoImageProcessor, AutoTokenizer
from transformers.utils import is_torchvision_available

from vla_scale.config.schema import BackboneConfig, TinyBackboneConfig

_REGISTRY: dict[str, type[BackboneAdapter]] = {}


class UnknownBackboneError(KeyError):
    """A family name not in the registry (a KeyError whose message prints without quotes)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class BackboneAdapter(nn.Module, ABC):
    """One VLM family behind the interface RoboVLM needs.

    Subclasses hold the Hugging Face model as `self.model` (so its parameters are ours
    for the optimizer, ZeRO and LoRA), plus its tokenizer and image processor.
    """

    family: str = ""
    model_class: type[nn.Module] | None = None  # the HF class the default `from_pretrained` loads
    image_start_id: int | None = None
    image_end_id: int | None = None
    # Set by RoboVLM when a resampler replaces the tower's tokens by latents that have no patch grid:
    # families whose positions follow the grid (Qwen's multimodal RoPE) then give them 1D positions.
    images_resampled: bool = False

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        # Plain floats, not buffers: a bf16 cast of the module must not round them.
        self.image_mean = [float(x) for x in image_processor.image_mean]
        self.image_std = [float(x) for x in image_processor.image_std]
        self.rescale_factor = float(getattr(image_processor, "rescale_factor", 1 / 255))

    # --- sizes and special tokens -------------------------------------------------
    @property
    @abstractmethod
    def hidden_size(self) -> int:
        """Width D of the language model's embeddings."""

    @property
    @abstractmethod
    def image_size(self) -> int:
        """Square side the vision tower expects; uint8 images are resized to it."""

    @property
    def bos_id(self) -> int | None:
        return self.tokenizer.bos_token_id

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def embed_dtype(self) -> torch.dtype:
        """Dtype of the LM input embeddings (bf16 under DeepSpeed bf16); fused inputs are cast to it."""
        return self.model.get_input_embeddings().weight.dtype

    # --- modules (staged unfreezing, checkpointing, LoRA targeting) ---------------
    @property
    def decoder_layers(self) -> nn.ModuleList:
        """The LM decoder layers, in order (staged unfreezing, LoRA targeting, checkpointing)."""
        return self.language_model.layers

    @property
    @abstractmethod
    def vision_module(self) -> nn.Module:
        """The vision tower."""

    @property
    def projector(self) -> nn.Module | None:
        """The vision-to-LM projector, when the family has one."""
        return None

    @property
    def lm_head(self) -> nn.Module:
        return self.model.get_output_embeddings()

    # --- computation ----------------------------------------------------------------
    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids `[...]` → LM input embeddings `[..., D]`."""
        return self.model.get_input_embeddings()(ids)

    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → float pixels resized and normalised the way the vision tower was trained.

        A square resize (no crop): robot frames are already framed by the dataset.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"images must be uint8 [B, C, H, W] (the Batch contract), got {images.dtype}")
        x = images.float()
        size = self.image_size
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 255)
        mean = torch.tensor(self.image_mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.image_std, device=x.device).view(1, -1, 1, 1)
        return (x * self.rescale_factor - mean) / std

    @abstractmethod
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 `[B, C, H, W]` → image tokens `[B, N, D]` in the LM embedding space."""

    @property
    @abstractmethod
    def language_model(self) -> nn.Module:
        """The decoder stack that runs on `inputs_embeds` (no vision tower, no vocabulary projection)."""

    def lm_position_ids(
        self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, past_length: int
    ) -> torch.Tensor | None:
        """Position ids for the LM, or None for the decoder's own default; families with special positions
        (PaliGemma's 1-indexed, Qwen's multimodal 3D, Kosmos-2's mask-derived) override this."""
        return None

    def lm_forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        past_key_values: Any = None,
        use_cache: bool = False,
        return_logits: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, Any]:
        """Run the LM on embeddings → (hidden `[B, L, D]` after the final norm, logits `[B, L, V]` or None, cache).

        The decoder stack is called directly: the families' top-level forwards insist on image placeholder
        ids. `return_logits=False` skips the vocabulary projection (robot batches do not need it).
        """
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask.long(),
            position_ids=self.lm_position_ids(inputs_embeds, attention_mask, past),
            cache=past_key_values,
            use_cache=use_cache,
            return_dict=True,
        )
        hidden = out.last_hidden_state
        logits = self.compute_logits(hidden) if return_logits else None
        return hidden, logits, out.cache if use_cache else None

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final hidden states `[..., D]` → vocabulary logits `[..., V]`, exactly as `lm_forward` makes them.

        Lets a caller project only the positions it needs (discrete action ids) instead of every position.
        """
        return self.lm_head(hidden)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute decoder/vision layer activations in backward (non-reentrant, so frozen inputs are fine)."""
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # --- loading and saving ---------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, path_or_id: str, trust_remote_code: bool = False, torch_dtype: torch.dtype | str | None = None
    ) -> BackboneAdapter:
        """Load model (`model_class`), tokenizer and image processor from a local folder or hub id.

        float32 unless `torch_dtype` says otherwise; `trust_remote_code` reaches the processors only
        (every supported family is in transformers itself).
        """
        if cls.model_class is None:
            raise NotImplementedError(f"{cls.__name__} must set model_class or override from_pretrained")
        model = cls.model_class.from_pretrained(path_or_id, dtype=resolve_dtype(torch_dtype))
        tokenizer, image_processor = load_processors(path_or_id, trust_remote_code)
        return cls(model, tokenizer, image_processor)

    @classmethod
    @abstractmethod
    def build_tiny(cls, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0) -> BackboneAdapter:
        """Write a random-weight checkpoint of the family's real config classes to `out_dir`; return it in memory."""

    def save_pretrained(self, out_dir: str | os.PathLike) -> None:
        """Save model, tokenizer and image processor so `from_pretrained(out_dir)` restores the adapter."""
        self.model.save_pretrained(out_dir)
        self.tokenizer.save_pretrained(out_dir)
        self.image_processor.save_pretrained(out_dir)


class ConditionalGenerationAdapter(BackboneAdapter):
    """Families laid out as HF `*ForConditionalGeneration` with `model.model.{vision_tower, multi_modal_projector,
    language_model}` and `model.lm_head` (LLaVA, PaliGemma): the module accessors are the same for all of them."""

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.text_config.hidden_size)

    @property
    def image_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def language_model(self) -> nn.Module:
        return self.model.model.language_model

    @property
    def vision_module(self) -> nn.Module:
        return self.model.model.vision_tower

    @property
    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def lm_head(self) -> nn.Module:
        return self.model.lm_head


def load_processors(path_or_id: str, trust_remote_code: bool) -> tuple[Any, Any]:
    """Tokenizer and image processor of a checkpoint (only the image processor's mean/std/rescale are used,
    so its PIL backend, which needs no torchvision, is enough)."""
    tokenizer = AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=trust_remote_code)
    backend = {} if is_torchvision_available() else {"backend": "pil"}
    image_processor = AutoImageProcessor.from_pretrained(path_or_id, trust_remote_code=trust_remote_code, **backend)
    return tokenizer, image_processor


def resolve_dtype(torch_dtype: torch.dtype | str | None) -> torch.dtype | str:
    """None → float32 (transformers 5 would otherwise pick the checkpoint's dtype); strings like "bfloat16" → dtype."""
    if torch_dtype is None:
        return torch.float32
    if isinstance(torch_dtype, str) and torch_dtype != "auto":
        value = getattr(torch, torch_dtype, None)
        if not isinstance(value, torch.dtype):
            raise ValueError(f"unknown torch dtype {torch_dtype!r}; use e.g. 'float32', 'bfloat16' or 'auto'")
        return value
    return torch_dtype


# --- registry -------------------------------------------------------------------------
def register_backbone(name: str) -> Callable[[type[BackboneAdapter]], type[BackboneAdapter]]:
    """Class decorator: make an adapter loadable by its family name (`model.backbone.family` in the config)."""

    def decorator(cls: type[BackboneAdapter]) -> type[BackboneAdapter]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"backbone family {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.family = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def get_backbone_class(name: str) -> type[BackboneAdapter]:
    """The adapter class for a family; an unknown name is an error that suggests the closest registered ones."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    registered = ", ".join(available_backbones())
    raise UnknownBackboneError(
        f"unknown backbone family {name!r} (model.backbone.family).{hint} Registered: {registered}"
    )


def load_backbone(
    family: str, path_or_id: str, trust_remote_code: bool = False, torch_dtype: torch.dtype | str | None = None
) -> BackboneAdapter:
    """Load a family's checkpoint through the registry."""
    if not path_or_id:
        raise ValueError("model.backbone.pretrained is empty: set it to a local folder or a hub id")
    return get_backbone_class(family).from_pretrained(path_or_id, trust_remote_code, torch_dtype)


def build_tiny_backbone(
    family: str, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0
) -> BackboneAdapter:
    """Write a tiny random-weight checkpoint of `family` to `out_dir` (tests, CPU demo)."""
    return get_backbone_class(family).build_tiny(tiny_cfg, out_dir, seed=seed)


def ensure_tiny_backbone(cfg: BackboneConfig, seed: int = 0) -> bool:
    """If `cfg.tiny` is set and `cfg.pretrained` is a missing folder, write the tiny checkpoint there.

    Written to a temporary sibling and renamed into place, so ranks racing on a shared
    filesystem never see a half-written folder. Returns True when this call wrote it.
    """
    if cfg.tiny is None or not cfg.pretrained:
        return False
    tiny = cfg.tiny
    return write_folder_once(cfg.pretrained, lambda tmp: build_tiny_backbone(cfg.family, tiny, tmp, seed=seed))


def write_folder_once(target: str | os.PathLike, build: Callable[[Path], Any]) -> bool:
    """Run `build(tmp)` into a temporary sibling of the missing folder `target` and rename it into place.

    Ranks racing on a shared filesystem never see a half-written folder; a build must be deterministic
    (same seed), since the loser's copy is discarded. Returns True when this call wrote `target`.
    """
    target = Path(target)
    if target.exists():
        return False
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # transformers' save_pretrained writes weights on rank 0 only: this rank's copy would lack them.
        raise RuntimeError(
            f"{target} does not exist and rank {torch.distributed.get_rank()} cannot write it: write tiny checkpoints "
            "before the process group starts (launchers/train.sh does, in its prepare step)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():
                raise
            return False  # another rank won the race; its copy is identical (same seed)
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
