"""The typed run configuration: one dataclass per YAML section.

Every field has a default that is safe for a tiny CPU run; the YAML files in
`configs/` override what a recipe needs. The loader in `vla_scale.config.load`
turns YAML into these classes and rejects unknown keys and wrong types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from vla_scale.config.schema_debug import DebugConfig


@dataclass
class RunConfig:
    """Where a run lives and what makes it reproducible."""

    name: str = "debug"
    output_dir: str = "runs"  # the run directory is <output_dir>/<name>
    seed: int = 0


@dataclass
class SourceConfig:
    """One dataset (a folder with manifest.json, stats.json and shards) and its mixing weight."""

    path: str = ""
    weight: float = 1.0


@dataclass
class AugmentConfig:
    """Robot-frame augmentation; one draw per camera per window, shared by the window's frames."""

    enabled: bool = False
    crop: Literal["none", "shift", "resized_crop"] = "shift"
    shift_px: int = 4  # shift: edge-pad by this many pixels, crop back at a random offset
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # resized_crop: area fraction range
    brightness: float = 0.2  # colour jitter strengths; 0 turns each off
    contrast: float = 0.2
    saturation: float = 0.2


@dataclass
class DataConfig:
    """How shards become batches: windowing, mixing, workers and the bad-sample policy."""

    sources: list[SourceConfig] = field(default_factory=list)
    window_size: int = 1  # frames of history per training sample
    fwd_pred_next_n: int = 1  # action chunk length predicted at each frame
    num_workers: int = 1  # DataLoader workers per rank
    prefetch_factor: int = 2
    shuffle_buffer: int = 64  # windows held for shuffling, per worker
    shard_shuffle: bool = True
    max_text_len: int = 48  # token budget for instructions and VL conversations
    bad_sample_policy: Literal["skip", "fail"] = "skip"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class TinyBackboneConfig:
    """Sizes of a random-weight backbone built from the family's real config class (tests, CPU demo)."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 2
    vision_heads: int = 2
    image_size: int = 64
    patch_size: int = 16


@dataclass
class BackboneConfig:
    """Which VLM is turned into the policy and how it is loaded."""

    family: str = "llava"
    pretrained: str = ""  # local folder or hub id passed to from_pretrained
    # When set and `pretrained` is a missing local folder, a random-weight backbone of
    # these sizes is written there with save_pretrained before training starts.
    tiny: TinyBackboneConfig | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True


@dataclass
class ActionHeadConfig:
    """The head that turns action-token hidden states into an action chunk."""

    # mlp: each frame on its own; lstm / gpt (history_type post only): a causal LSTM / transformer over the
    # window's per-frame action features, with per-episode memory at inference
    type: Literal["mlp", "lstm", "gpt"] = "mlp"
    hidden_size: int = 256
    arm_loss: Literal["mse", "huber"] = "mse"
    num_layers: int = 2  # lstm / gpt: layers over time
    num_heads: int = 4  # gpt: attention heads (must divide hidden_size)
    # lstm / gpt: frames the head remembers at inference (and gpt's positions); 0 = data.window_size (set by
    # load_config). Training windows are window_size frames, so any other value would meet unseen contexts.
    max_history: int = 0


@dataclass
class LossWeightsConfig:
    """Weights of the named loss terms in the total `loss`."""

    arm: float = 1.0
    gripper: float = 0.01
    vl: float = 1.0
    action_ce: float = 1.0  # discrete action tokens: next-token cross-entropy
    clip: float = 1.0  # CLIP regulariser (`model.clip_reg`), robot batches only


@dataclass
class DiscreteActionConfig:
    """`action_space: discrete`: each normalised action dim binned onto the LM's last `n_bin` vocabulary ids."""

    n_bin: int = 256
    min_action: float = -1.0  # bins cover [min_action, max_action]; values outside are clipped
    max_action: float = 1.0
    supervise_eos: bool = False  # append EOS after the action ids and train the LM to emit it


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the linear layers of the language model's decoder layers."""

    enabled: bool = False
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear", or module names matched as suffixes inside the decoder layers (e.g. [q_proj, v_proj]).
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ResamplerConfig:
    """Perceiver resampler: each image's tokens → `num_latents` learned latents (width = LM hidden size)."""

    enabled: bool = False
    num_latents: int = 16  # tokens per image after resampling
    depth: int = 2  # cross-attention + feed-forward blocks
    heads: int = 4
    dim_head: int = 64  # attention width = heads x dim_head
    ff_mult: int = 4  # feed-forward width = ff_mult x LM hidden size


@dataclass
class TinyClipConfig:
    """Sizes of a random-weight CLIP text model (tests, CPU demo); its projection width is `clip_reg.embed_dim`."""

    hidden_size: int = 32
    num_layers: int = 1
    num_heads: int = 2
    intermediate_size: int = 64


@dataclass
class ClipRegConfig:
    """CLIP regulariser: pooled action-token states, projected, pulled toward the instruction's CLIP text embedding."""

    enabled: bool = False
    pretrained: str = "openai/clip-vit-base-patch32"  # local folder or hub id (CLIPTextModelWithProjection)
    embed_dim: int = 512  # the CLIP model's projection_dim (checked at load); fixes the projection's shape
    loss: Literal["cosine", "smooth_l1"] = "cosine"
    # When set and `pretrained` is a missing local folder, a random-weight CLIP text model is written there.
    tiny: TinyClipConfig | None = None


@dataclass
class ModelConfig:
    """RoboVLM: the backbone plus fusion, action tokens and heads."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # continuous: learnable action tokens + regression head; discrete: action ids + next-token loss
    action_space: Literal["continuous", "discrete"] = "continuous"
    # post: one frame per VLM sequence (window folded into the batch), history fused by the head (lstm / gpt);
    # pre: the window's frames interleaved in one sequence, action tokens after each frame;
    # video: the window's frames in one sequence, one set of action tokens for the last frame
    history_type: Literal["post", "pre", "video"] = "post"
    latent_num: int = 1  # learnable action tokens inserted per frame
    use_state: bool = False  # insert a proprioceptive state token after the image tokens
    # Robot sequences: put the instruction before the image (image tokens then attend to it).
    instruction_first: bool = False
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    discrete: DiscreteActionConfig = field(default_factory=DiscreteActionConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    clip_reg: ClipRegConfig = field(default_factory=ClipRegConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.0


# Named parameter groups a stage can make trainable (resolved in `vla_scale.train.stages`);
# also `decoder_last_<N>` and `re:<regex>`.
TRAINABLE_GROUPS = (
    "all",
    "heads",
    "action_head",
    "action_token",
    "state_encoder",
    "resampler",
    "vision",
    "projector",
    "embeddings",
    "lm_head",
    "decoder",
    "language_model",
    "lora",
)


@dataclass
class StageConfig:
    """One stage of the unfreezing schedule: from `start_step` on, only `trainable` parameters train.

    Names (see `vla_scale.train.stages`): heads, action_head, action_token, state_encoder,
    resampler, vision, projector, embeddings, lm_head, decoder, decoder_last_<N>,
    language_model, lora, all, or `re:<regex>` over parameter names.
    """

    start_step: int = 0
    trainable: list[str] = field(default_factory=lambda: ["all"])
    lr_scale: float = 1.0


@dataclass
class TrainConfig:
    """The DeepSpeed engine and the loop around it."""

    max_steps: int = 10
    micro_batch_size: int = 2  # per rank, per forward
    global_batch_size: int = 4  # micro_batch_size x world_size x grad accumulation
    zero_stage: int = 2
    bf16: bool = False
    fp16: bool = False  # dynamic loss scaling; the scale is logged as `loss_scale`
    offload_optimizer: bool = False  # ZeRO >= 1: optimizer state and step on CPU (DeepSpeed cpu_adam)
    offload_params: bool = False  # ZeRO-3: parameters live on CPU between uses
    grad_clip: float = 1.0
    log_every: int = 1
    ckpt_every: int = 0  # 0: only at the end
    keep_last: int = 2
    process_group_timeout_s: int = 600
    # A step whose loss or gradients are NaN/inf is skipped; this many in a row stop the run.
    max_bad_steps: int = 5
    # Unfreezing schedule; empty = one stage training everything (or heads + LoRA when LoRA is on).
    stages: list[StageConfig] = field(default_factory=list)


@dataclass
class WandbConfig:
    """Weights & Biases; `auto` means online with an API key, offline without."""

    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    project: str = "vla_scale"
    entity: str | None = None


@dataclass
class Config:
    """One run, as described by one YAML file plus `section.key=value` overrides."""

    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
