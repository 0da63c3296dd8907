"""`model:` — RoboVLM: the backbone, how the window is fused, the action tokens and the heads.

The optional mechanisms (discrete actions, LoRA, resampler, CLIP regulariser) live in
`schema_mechanisms`; this module decides which combinations can run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

from vla_scale.config.errors import ConfigError, check_at_least
from vla_scale.config.schema_mechanisms import (
    ClipRegConfig,
    DiscreteActionConfig,
    FlowConfig,
    LoraConfig,
    ResamplerConfig,
    TinyClipConfig,
)

__all__ = [
    "HISTORY_HEADS",
    "NO_CUSTOM_MASK_FAMILIES",
    "ActionHeadConfig",
    "BackboneConfig",
    "ClipRegConfig",
    "DiscreteActionConfig",
    "FlowConfig",
    "LoraConfig",
    "LossWeightsConfig",
    "ModelConfig",
    "ResamplerConfig",
    "TinyBackboneConfig",
    "TinyClipConfig",
    "check_fast_tokenizer",
    "check_history_window",
    "default_fast_path",
    "validate_history",
    "validate_parallel",
]

HISTORY_HEADS = ("lstm", "gpt")  # heads that fuse the window over time themselves
# Families whose LM cannot take a prepared 4-D attention mask (adapter `custom_mask = False`): no parallel decoding.
NO_CUSTOM_MASK_FAMILIES = ("kosmos2",)


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

    family: str = "llava"  # checked against the backbone registry by `prepare` (the registry imports transformers)
    pretrained: str = ""  # local folder or hub id passed to from_pretrained
    # When set and `pretrained` is a missing local folder, a random-weight backbone of
    # these sizes is written there with save_pretrained before training starts.
    tiny: TinyBackboneConfig | None = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = True

    def validate(self, prefix: str = "model.backbone") -> None:
        if not self.pretrained:
            raise ConfigError(f"{prefix}.pretrained is empty: give a local folder or a hub id")


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
    # lstm / gpt: frames the head remembers at inference (and gpt's positions); 0 = data.window_size (filled in
    # by `Config`). Training windows are window_size frames, so any other value would meet unseen contexts.
    max_history: int = 0


@dataclass
class LossWeightsConfig:
    """Weights of the named loss terms in the total `loss`."""

    arm: float = 1.0
    gripper: float = 0.01
    vl: float = 1.0
    action_ce: float = 1.0  # discrete action tokens: next-token cross-entropy
    flow: float = 1.0  # flow matching: velocity MSE (`action_space: flow`)
    clip: float = 1.0  # CLIP regulariser (`model.clip_reg`), robot batches only

    def validate(self, prefix: str = "model.loss_weights") -> None:
        check_at_least(self, prefix, tuple(f.name for f in fields(self)), 0)


@dataclass
class ModelConfig:
    """RoboVLM: the backbone plus fusion, action tokens and heads."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    # continuous: learnable action tokens + regression head; discrete: action ids + next-token loss;
    # parallel: one learned position per chunk step, the chunk decoded in one pass (bidirectional among the
    # action positions), a linear layer per position, L1 + gripper BCE (OpenVLA-OFT style, model/parallel.py);
    # flow: learnable action tokens + a flow-matching action expert (`model.flow`)
    action_space: Literal["continuous", "discrete", "parallel", "flow"] = "continuous"
    # post: one frame per VLM sequence (window folded into the batch), history fused by the head (lstm / gpt);
    # pre: the window's frames interleaved in one sequence, action tokens after each frame;
    # video: the window's frames in one sequence, one set of action tokens for the last frame
    history_type: Literal["post", "pre", "video"] = "post"
    latent_num: int = 1  # learnable action tokens inserted per frame
    use_state: bool = False  # insert a proprioceptive state token after the image tokens
    # Robot sequences: put the instruction before the image (image tokens then attend to it).
    instruction_first: bool = False
    film: bool = False  # the instruction scales/shifts the image tokens (FiLM) before the LM (model/film.py)
    # Spatial-softmax keypoints of the static camera's image tokens (after FiLM), added to the action states:
    # how many (0: off). Continuous and flow action spaces (the flow expert reads the same action states);
    # needs a square image-token grid (model/keypoints.py).
    keypoints: int = 0
    # Average-pool each image's square token grid k x k before the LM (1: off); keypoints still see the full grid.
    image_pool: int = 1
    head: ActionHeadConfig = field(default_factory=ActionHeadConfig)
    discrete: DiscreteActionConfig = field(default_factory=DiscreteActionConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    loss_weights: LossWeightsConfig = field(default_factory=LossWeightsConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    clip_reg: ClipRegConfig = field(default_factory=ClipRegConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self, prefix: str = "model") -> None:
        """Everything the model block can check on its own (`Config.validate` adds the data.window_size check)."""
        check_at_least(self, prefix, ("latent_num",), 1)
        check_at_least(self, prefix, ("keypoints",), 0)
        check_at_least(self, prefix, ("image_pool",), 1)
        if self.image_pool > 1 and self.resampler.enabled:
            raise ConfigError(
                f"{prefix}.image_pool pools the image-token grid, which {prefix}.resampler replaces by latents: "
                "turn one of them off"
            )
        if self.keypoints and self.action_space not in ("continuous", "flow"):
            raise ConfigError(
                f"{prefix}.keypoints feeds the action states of the continuous head and the flow expert; with "
                f"{prefix}.action_space: {self.action_space} set {prefix}.keypoints: 0"
            )
        if self.keypoints and self.action_space == "flow" and self.flow.stop_gradient_to_vlm:
            raise ConfigError(
                f"{prefix}.keypoints learn from the action loss, which {prefix}.flow.stop_gradient_to_vlm keeps from "
                f"everything before the expert: set {prefix}.flow.stop_gradient_to_vlm: false or {prefix}.keypoints: 0"
            )
        if self.keypoints and self.resampler.enabled:
            raise ConfigError(
                f"{prefix}.keypoints reads positions off the image-token grid, which {prefix}.resampler replaces by "
                f"latents: turn one of them off"
            )
        validate_parallel(self, prefix)
        validate_fast(self, prefix)
        self.backbone.validate(f"{prefix}.backbone")
        self.discrete.validate(f"{prefix}.discrete")
        self.flow.validate(f"{prefix}.flow")
        validate_history(self, prefix=prefix)
        self.resampler.validate(f"{prefix}.resampler")
        self.clip_reg.validate(f"{prefix}.clip_reg")
        self.loss_weights.validate(f"{prefix}.loss_weights")
        self.lora.validate(f"{prefix}.lora")


def validate_history(m: ModelConfig, window_size: int | None = None, prefix: str = "model") -> None:
    """History type x head x action space combinations (mechanism 4); `window_size` adds the head-memory check.

    Also called by `RoboVLM` itself, so a model built without `load_config` fails the same way.
    """
    head = m.head
    if head.type in HISTORY_HEADS:
        if m.history_type != "post":
            raise ConfigError(
                f"{prefix}.head.type={head.type} fuses the window over time itself and needs "
                f"{prefix}.history_type: post; with history_type {m.history_type} the VLM already sees the window: "
                f"use {prefix}.head.type: mlp"
            )
        if m.action_space != "continuous":
            raise ConfigError(
                f"{prefix}.head.type={head.type} needs {prefix}.action_space: continuous (the {m.action_space} action "
                f"space predicts with the LM or the flow expert, not a head); set {prefix}.head.type: mlp"
            )
        check_at_least(head, f"{prefix}.head", ("num_layers",), 1)
        if head.max_history < 0:
            raise ConfigError(f"{prefix}.head.max_history must be >= 0 (0: data.window_size), got {head.max_history}")
    if head.type == "gpt" and (head.num_heads < 1 or head.hidden_size % head.num_heads):
        raise ConfigError(
            f"{prefix}.head.num_heads ({head.num_heads}) must be >= 1 and divide "
            f"{prefix}.head.hidden_size ({head.hidden_size})"
        )
    if window_size is not None:
        check_history_window(m, window_size, prefix)


def validate_parallel(m: ModelConfig, prefix: str = "model") -> None:
    """`action_space: parallel` combinations (also called by `RoboVLM`): one position per chunk step, no history
    head, and an LM that takes a custom 4-D attention mask."""
    if m.action_space != "parallel":
        return
    if m.latent_num != 1:
        raise ConfigError(
            f"{prefix}.action_space: parallel puts one action position per chunk step (data.fwd_pred_next_n of "
            f"them); {prefix}.latent_num={m.latent_num} has no meaning there: leave it at 1"
        )
    if m.head.type != "mlp":
        raise ConfigError(
            f"{prefix}.head.type={m.head.type} is a head over learned action tokens; {prefix}.action_space: parallel "
            f"maps each position with a linear layer itself: set {prefix}.head.type: mlp"
        )
    if m.backbone.family in NO_CUSTOM_MASK_FAMILIES:
        raise ConfigError(
            f"{prefix}.action_space: parallel needs bidirectional attention among the action positions (a custom "
            f"4-D attention mask), which {prefix}.backbone.family={m.backbone.family} cannot take; use another "
            "family or action_space continuous / discrete"
        )


def check_history_window(m: ModelConfig, window_size: int, prefix: str = "model") -> None:
    """Cross-section: a history head keeps exactly the `data.window_size` frames it was trained on."""
    head = m.head
    if head.type in HISTORY_HEADS and head.max_history not in (0, window_size):
        raise ConfigError(
            f"{prefix}.head.max_history ({head.max_history}) must equal data.window_size ({window_size}) for "
            f"{prefix}.head.type={head.type}: the head trains on windows of window_size frames and keeps as many at "
            "inference; set it to 0 to follow data.window_size"
        )


FAST_FILE = "fast_tokenizer.json"  # as vla_scale.model.fast_tokenizer.FILE_NAME (config code imports no tokenizers)


def validate_fast(m: ModelConfig, prefix: str = "model") -> None:
    """`model.discrete.tokenizer: fast` combinations: the discrete action space, one action slot per sequence."""
    if m.discrete.tokenizer != "fast":
        return
    if m.action_space != "discrete":
        raise ConfigError(
            f"{prefix}.discrete.tokenizer: fast tokenises the chunk for {prefix}.action_space: discrete; with "
            f"action_space {m.action_space} set {prefix}.discrete.tokenizer: bins (or action_space: discrete)"
        )
    if m.history_type == "pre":
        raise ConfigError(
            f"{prefix}.discrete.tokenizer: fast puts a variable number of tokens in one action slot per sequence; "
            f"{prefix}.history_type: pre has one slot per frame: use history_type post or video"
        )


# vla_scale.data.locations.REMOTE_PREFIXES (not imported: vla_scale.data imports this package)
REMOTE_PREFIXES = ("s3://", "http://", "https://", "pipe:")


def default_fast_path(source_paths: list[str]) -> str:
    """fast_tokenizer.json beside the stats.json of the first source that has one (the robot dataset), else
    beside the first source (validation then names it as missing). A remote source has no local folder to
    default into (`Path("s3://b/ds")` is `s3:/b/ds`), so with one the path must be given."""
    for path in source_paths:
        if not path.startswith(REMOTE_PREFIXES) and (Path(path) / "stats.json").is_file():
            return str(Path(path) / FAST_FILE)
    remote = [p for p in source_paths if p.startswith(REMOTE_PREFIXES)]
    if remote:
        raise ConfigError(
            f"model.discrete.fast_path: data source {remote[0]} is remote, so the FAST tokenizer file has no "
            "default place beside it: set model.discrete.fast_path to a local fast_tokenizer.json (fit it with "
            "`python -m data_tools fit-fast` on a local copy of the dataset, --out that path)"
        )
    return str(Path(source_paths[0]) / FAST_FILE) if source_paths else FAST_FILE


def check_fast_tokenizer(m: ModelConfig, chunk_size: int, prefix: str = "model") -> None:
    """Cross-section: a FAST run needs a fitted tokenizer file for the chunks it trains (`data.fwd_pred_next_n`)."""
    if m.discrete.tokenizer != "fast":
        return
    if m.discrete.fast_path.startswith(REMOTE_PREFIXES):
        raise ConfigError(f"{prefix}.discrete.fast_path: {m.discrete.fast_path} must be a local file, not a URL")
    path = Path(m.discrete.fast_path)
    fit = f"`python -m data_tools fit-fast DATASET --chunk {chunk_size}`"
    if not path.is_file():
        raise ConfigError(
            f"{prefix}.discrete.tokenizer: fast needs a fitted FAST tokenizer, and {prefix}.discrete.fast_path "
            f"({path}) does not exist: fit it with {fit} (it writes DATASET/{FAST_FILE})"
        )
    try:
        header = json.loads(path.read_text())
        fitted = int(header["chunk_size"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(
            f"{prefix}.discrete.fast_path ({path}) is not a FAST tokenizer file ({err}); refit: {fit}"
        ) from err
    if fitted != chunk_size:
        raise ConfigError(
            f"{prefix}.discrete.fast_path ({path}) was fitted on chunks of {fitted} steps but data.fwd_pred_next_n is "
            f"{chunk_size}: refit with {fit}"
        )
