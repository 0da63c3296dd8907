"""`model.*` blocks for the optional mechanisms: discrete actions, the flow-matching expert, LoRA, the Perceiver
resampler and the CLIP regulariser. Each block checks its own sizes; `ModelConfig` decides when a block applies."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vla_scale.config.errors import ConfigError, check_at_least


@dataclass
class DiscreteActionConfig:
    """`action_space: discrete`: each normalised action dim binned onto the LM's last `n_bin` vocabulary ids."""

    n_bin: int = 256
    min_action: float = -1.0  # bins cover [min_action, max_action]; values outside are clipped
    max_action: float = 1.0
    supervise_eos: bool = False  # append EOS after the action ids and train the LM to emit it
    # bins: one id per dim per step (n_bin / min_action / max_action); fast: the chunk as FAST tokens (DCT + BPE,
    # model/fast_tokenizer.py) on the LM's last ids, a variable number per chunk, always ended by a supervised EOS
    tokenizer: Literal["bins", "fast"] = "bins"
    # fast: the fitted tokenizer (`python -m data_tools fit-fast`); "" = fast_tokenizer.json of the first data
    # source that has a stats.json (the robot dataset), filled in when the config is loaded
    fast_path: str = ""

    def validate(self, prefix: str = "model.discrete") -> None:
        # n_bin < vocabulary size is checked when the model is built (the vocabulary is the backbone's).
        if self.tokenizer not in ("bins", "fast"):
            raise ConfigError(f"{prefix}.tokenizer must be 'bins' or 'fast', got {self.tokenizer!r}")
        check_at_least(self, prefix, ("n_bin",), 2)
        if not self.min_action < self.max_action:
            raise ConfigError(
                f"{prefix}.min_action ({self.min_action}) must be < {prefix}.max_action ({self.max_action})"
            )


@dataclass
class FlowConfig:
    """`action_space: flow`: a small transformer (the action expert) denoises the chunk by flow matching while
    cross-attending to the VLM's action-token states (model/flow.py, model/flow_expert.py)."""

    width: int = 64  # expert hidden size (the VLM states are projected to it)
    layers: int = 2
    heads: int = 4  # must divide width
    num_steps: int = 10  # Euler steps at inference, from t=1 (noise) to t=0 (the chunk)
    # Knowledge insulation: the expert reads detached VLM states, so its loss trains the expert only and the VLM
    # learns through the other losses (VL co-training, the CLIP regulariser).
    stop_gradient_to_vlm: bool = False

    def validate(self, prefix: str = "model.flow") -> None:
        check_at_least(self, prefix, ("width", "layers", "heads", "num_steps"), 1)
        if self.width % self.heads:
            raise ConfigError(f"{prefix}.heads ({self.heads}) must divide {prefix}.width ({self.width})")


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the linear layers of the language model's decoder layers."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear", or module names matched as suffixes inside the decoder layers (e.g. [q_proj, v_proj]).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self, prefix: str = "model.lora") -> None:
        """Checked only when enabled: a disabled block may keep any values."""
        if not self.enabled:
            return
        if self.r < 1 or self.alpha <= 0:
            raise ConfigError(f"{prefix} needs r >= 1 and alpha > 0, got r={self.r}, alpha={self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{prefix}.dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError(f"{prefix}.target_modules is empty: use [all-linear] or name modules like q_proj")


@dataclass
class ResamplerConfig:
    """Perceiver resampler: each image's tokens → `num_latents` learned latents (width = LM hidden size)."""

    enabled: bool = False
    num_latents: int = 16  # tokens per image after resampling
    depth: int = 2  # cross-attention + feed-forward blocks
    heads: int = 4
    dim_head: int = 64  # attention width = heads x dim_head
    ff_mult: int = 4  # feed-forward width = ff_mult x LM hidden size

    def validate(self, prefix: str = "model.resampler") -> None:
        # Works with either action space and every backbone family (resampled images get 1D positions
        # where a family's positions follow the patch grid).
        check_at_least(self, prefix, ("num_latents", "depth", "heads", "dim_head", "ff_mult"), 1)


@dataclass
class TinyClipConfig:
    """Sizes of a random-weight CLIP text model (tests, CPU demo); its projection width is `clip_reg.embed_dim`."""

    hidden_size: int = 32
    num_layers: int = 1
    num_heads: int = 2
    intermediate_size: int = 64

    def validate(self, prefix: str = "model.clip_reg.tiny") -> None:
        if self.num_heads < 1 or self.hidden_size % self.num_heads:
            raise ConfigError(
                f"{prefix}.num_heads ({self.num_heads}) must be >= 1 and divide {prefix}.hidden_size "
                f"({self.hidden_size})"
            )


@dataclass
class ClipRegConfig:
    """CLIP regulariser: pooled action-token states, projected, pulled toward the instruction's CLIP text embedding."""

    enabled: bool = False
    pretrained: str = "openai/clip-vit-base-patch32"  # local folder or hub id (CLIPTextModelWithProjection)
    embed_dim: int = 512  # the CLIP model's projection_dim (checked at load); fixes the projection's shape
    loss: Literal["cosine", "smooth_l1"] = "cosine"
    # When set and `pretrained` is a missing local folder, a random-weight CLIP text model is written there.
    tiny: TinyClipConfig | None = None

    def validate(self, prefix: str = "model.clip_reg") -> None:
        if self.embed_dim < 1:
            raise ConfigError(
                f"{prefix}.embed_dim must be >= 1 (the CLIP model's projection_dim), got {self.embed_dim}"
            )
        if self.enabled and not self.pretrained:
            raise ConfigError(
                f"{prefix}.pretrained is empty: give a CLIP checkpoint (local folder or hub id, e.g. "
                f"openai/clip-vit-base-patch32), or a missing folder plus {prefix}.tiny for a random tiny one"
            )
        if self.tiny is not None:
            self.tiny.validate(f"{prefix}.tiny")
