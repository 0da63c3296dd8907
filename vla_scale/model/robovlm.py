"""RoboVLM: a pretrained VLM turned into a robot policy by token fusion and an action path.

One model, three roles in their own modules:

- `sequence.py` builds the LM inputs: image, state, instruction and action slots per frame or
  interleaved over the window (`model.history_type`), compacted so padding goes to the end.
- `continuous.py` (`model.action_space: continuous`): learned action tokens and an action head
  (mlp, or an lstm / gpt history head with per-episode memory) regressing the action chunk.
- `discrete.py` (`discrete`): the chunk as reserved vocabulary ids, next-token CE, greedy decoding.
- `parallel.py` (`parallel`): one learned position per chunk step, the chunk decoded in one pass (OFT style).
- `flow.py` (`flow`): the continuous path's action-token states condition a flow-matching action expert
  (`flow_expert.py`, parameter `action_expert`), sampled by Euler steps.

`RoboVLM` owns the parameters (names unchanged: `adapter`, `action_token`, `action_head`,
`state_encoder`, `resampler`, `clip_reg`, `film`, `keypoints`), encodes observations, dispatches a batch to the robot
path of its action space or to the vision-language co-training loss, and adds the auxiliary terms
(CLIP regulariser, zero-touch terms for ZeRO). Every model input is an `Observation`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from vla_scale.config.load import validate_history
from vla_scale.config.schema import ModelConfig
from vla_scale.config.schema_model import validate_parallel
from vla_scale.data.batch import IGNORE_INDEX, Batch
from vla_scale.data.observation import Observation
from vla_scale.model.action_tokenizer import ActionTokenizer
from vla_scale.model.backbones import BackboneAdapter, ensure_tiny_backbone, load_backbone
from vla_scale.model.backbones.loading import build_empty_backbone
from vla_scale.model.clip_regularizer import (
    ClipRegularizer,
    ClipTextTeacher,
    decode_instructions,
    ensure_tiny_clip,
    pool_action_states,
)
from vla_scale.model.continuous import ContinuousActions, build_continuous_modules
from vla_scale.model.discrete import DiscreteActions
from vla_scale.model.fast_actions import FastActions
from vla_scale.model.film import InstructionFiLM
from vla_scale.model.flow import FlowActions
from vla_scale.model.flow_expert import FlowExpert
from vla_scale.model.history_heads import HistoryHead
from vla_scale.model.keypoints import SpatialKeypoints
from vla_scale.model.lora import apply_lora
from vla_scale.model.parallel import ParallelActions, build_parallel_modules
from vla_scale.model.resampler import PerceiverResampler
from vla_scale.model.sequence import FusedSequence, SequenceBuilder, embed_text
from vla_scale.model.state_encoder import StateEncoder
from vla_scale.model.token_grid import pool_grid
from vla_scale.model.zero_sync import zero_touch


class RoboVLM(nn.Module):
    """Backbone adapter + action path (continuous, discrete or flow); `forward(batch)` returns named losses."""

    def __init__(
        self,
        cfg: ModelConfig,
        action_dim: int,
        state_dim: int,
        adapter: BackboneAdapter,
        chunk_size: int = 1,
        clip_teacher: ClipTextTeacher | None = None,
        binary_dims: int = 1,
        binary_state_dims: int = 1,
    ):
        """`binary_dims` / `binary_state_dims`: how many of the action / state dims are binary grippers (the last
        ones, by the Batch contract), from the dataset's declared spaces; 1 and 1 is the legacy layout."""
        super().__init__()
        if cfg.action_space not in ("continuous", "discrete", "parallel", "flow"):
            raise ValueError(
                f"model.action_space={cfg.action_space!r}; use 'continuous', 'discrete', 'parallel' or 'flow'"
            )
        if cfg.history_type not in ("post", "pre", "video"):
            raise ValueError(f"model.history_type={cfg.history_type!r}; use 'post', 'pre' or 'video'")
        validate_history(cfg)
        validate_parallel(cfg)
        if cfg.latent_num < 1:
            raise ValueError(f"model.latent_num must be >= 1, got {cfg.latent_num}")
        self.cfg = cfg
        self.action_dim = action_dim
        self.state_dim = state_dim
        self.binary_dims = binary_dims
        self.binary_state_dims = binary_state_dims
        self.chunk_size = chunk_size
        self.latent_num = cfg.latent_num
        self.adapter = adapter
        hidden = adapter.hidden_size
        dtype = adapter.embed_dtype  # match a backbone loaded in bf16
        # Parameters are created in this order (RNG draws, parameter order in checkpoints and ZeRO buffers).
        self.action_token: nn.Parameter | None = None
        self.action_head: nn.Module | None = None  # maps [B, T, latent_num, D] to [B, T, N, ...] chunks
        self.action_tokenizer: ActionTokenizer | None = None
        self.action_expert: FlowExpert | None = None
        self.actions: ContinuousActions | DiscreteActions | ParallelActions | FlowActions
        if cfg.action_space == "discrete":
            discrete = FastActions if cfg.discrete.tokenizer == "fast" else DiscreteActions
            self.actions = discrete(cfg, adapter, action_dim, chunk_size, binary_dims)
            self.action_tokenizer = self.actions.tokenizer
        elif cfg.action_space == "parallel":
            self.actions = ParallelActions(cfg, chunk_size, binary_dims)
            self.action_token, self.action_head = build_parallel_modules(hidden, action_dim, chunk_size, dtype)
        elif cfg.action_space == "flow":
            self.actions = FlowActions(cfg, action_dim, chunk_size, binary_dims)
            self.action_token = nn.Parameter((torch.randn(hidden) * 0.02).to(dtype))
            flow = cfg.flow
            self.action_expert = FlowExpert(hidden, action_dim, chunk_size, flow.width, flow.layers, flow.heads).to(
                dtype
            )
        else:
            self.actions = ContinuousActions(cfg, binary_dims)
            self.action_token, self.action_head = build_continuous_modules(
                cfg, hidden, action_dim, chunk_size, dtype, binary_dims
            )
        self.state_encoder = StateEncoder(state_dim, hidden, binary_state_dims).to(dtype) if cfg.use_state else None
        self.resampler: PerceiverResampler | None = None
        if cfg.resampler.enabled:
            self.resampler = PerceiverResampler.from_config(hidden, cfg.resampler).to(dtype)
        adapter.images_resampled = self.resampler is not None
        # The frozen CLIP text model stays outside the module tree (see clip_regularizer); only `proj` trains.
        self.clip_reg = ClipRegularizer(hidden, cfg.clip_reg, clip_teacher).to(dtype) if cfg.clip_reg.enabled else None
        self.film = InstructionFiLM(hidden).to(dtype) if cfg.film else None
        self.keypoints = SpatialKeypoints(hidden, cfg.keypoints).to(dtype) if cfg.keypoints else None
        self.sequences = SequenceBuilder(adapter, cfg.history_type, cfg.instruction_first)

    @property
    def tokenizer(self) -> Any:
        """The backbone's tokenizer (the data collate tokenizes with it)."""
        return self.adapter.tokenizer

    # --- observation encoding -------------------------------------------------------------
    def encode_images(self, images: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """uint8 `[B', C, H, W]` → image tokens `[B', N, D]`: the adapter's, `resampler.num_latents` of them, or
        the grid pooled by `model.image_pool` (`pool=False`: the full grid, for FiLM and keypoints first).

        Every image path (static and wrist cameras, VL images) goes through here, so the resampler is in
        every batch's graph and needs no ZeRO zero-touch.
        """
        tokens = self.adapter.encode_images(images)
        if self.resampler is not None:
            return self.resampler(tokens)
        return pool_grid(tokens, self.cfg.image_pool) if pool else tokens

    def robot_sequence(self, obs: Observation, **slot: Any) -> FusedSequence:
        """The observation's fused LM input (layout in `sequence.py`) with the action slot given by `slot`
        (`SequenceBuilder.fuse` keywords)."""
        return self.robot_sequence_and_keypoints(obs, **slot)[0]

    def robot_sequence_and_keypoints(self, obs: Observation, **slot: Any) -> tuple[FusedSequence, torch.Tensor | None]:
        """`robot_sequence` plus, with `model.keypoints`, the static camera's keypoint summary `[B, T, D]` (else
        None). Frames and wrist frames become image tokens (FiLM-modulated with `model.film`), the state one
        token per frame (`model.use_state`)."""
        cameras = [self.encode_images(rearrange(obs.images, "b t c h w -> (b t) c h w"), pool=False)]
        if obs.wrist_images is not None:
            cameras.append(self.encode_images(rearrange(obs.wrist_images, "b t c h w -> (b t) c h w"), pool=False))
        if self.film is not None:
            filmed = self._film(torch.cat(cameras, dim=1), obs)
            cameras = list(filmed.split([c.shape[1] for c in cameras], dim=1))
        keypoints = None
        if self.keypoints is not None:
            keypoints = rearrange(self.keypoints(cameras[0]), "(b t) d -> b t d", b=obs.batch_size)  # static camera
        image_tokens = torch.cat([pool_grid(c, self.cfg.image_pool) for c in cameras], dim=1)
        state_tokens = None
        if self.state_encoder is not None:
            if obs.state is None:
                raise ValueError("model.use_state is on but the batch has no `state` [B, T, S]")
            state_tokens = self.state_encoder(obs.state)  # [B, T, D]
        return self.sequences.robot(obs, image_tokens, state_tokens, **slot), keypoints

    def _film(self, image_tokens: torch.Tensor, obs: Observation) -> torch.Tensor:
        """Image tokens `[B*T, N, D]` modulated by each sample's instruction (the same for its T frames)."""
        keep = self.sequences.text_keep(obs.text_ids, obs.text_mask.bool(), strip_eos=True)
        text = InstructionFiLM.instruction_embedding(embed_text(self.adapter, obs.text_ids, keep), keep)
        frames = image_tokens.shape[0] // text.shape[0]
        return self.film(image_tokens, text.repeat_interleave(frames, dim=0))

    # --- training: dispatch and auxiliary terms ----------------------------------------------
    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Named 0-dim loss terms and metrics plus the weighted `loss` (names are the wandb keys).

        Robot batches: loss, loss_arm, and loss_gripper, acc_gripper when the action space has binary grippers
        (continuous, parallel) or loss, loss_action_ce,
        acc_action_token (discrete: argmax over the whole vocabulary on supervised positions), or loss, loss_flow
        (flow: the velocity MSE), plus loss_clip
        with the CLIP regulariser; VL batches: loss, loss_vl. All add `num_tokens` (LM positions attended,
        images included) for throughput, not a metric to average.
        """
        if batch.data_source == "robot":
            return self._robot_losses(batch)
        if batch.data_source == "vl":
            return self._vl_losses(batch)
        raise ValueError(f"unknown data_source {batch.data_source!r}; expected 'robot' or 'vl'")

    def _robot_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        if batch.action is None:
            raise ValueError("a robot batch needs `action` [B, T, N, A]")
        n, a = batch.action.shape[-2:]
        if (n, a) != (self.chunk_size, self.action_dim):
            raise ValueError(
                f"batch action chunk is N={n}, A={a} but the model was built for N={self.chunk_size}, "
                f"A={self.action_dim}: build_model(chunk_size=data.fwd_pred_next_n, action_dim=dataset action dims)"
            )
        out, states, action_mask = self.actions.losses(self, batch)
        if self.clip_reg is None:
            return out
        # CLIP regulariser: the action positions' states `[B*T', K, D]`, pooled per sample, against the instruction.
        pooled = pool_action_states(states, batch.batch_size, action_mask)
        texts = decode_instructions(self.adapter.tokenizer, batch.text_ids, batch.text_mask)
        out["loss_clip"] = self.clip_reg(pooled, texts)
        out["loss"] = out["loss"] + self.cfg.loss_weights.clip * out["loss_clip"]
        return out

    def _vl_losses(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Vision-language co-training: next-token CE on the labelled text after `[BOS] image`."""
        if batch.images.dim() != 5 or batch.images.shape[1] != 1:
            raise ValueError(f"a VL batch needs images [B, 1, C, H, W], got shape {tuple(batch.images.shape)}")
        image_tokens = self.encode_images(batch.images[:, 0])
        mask = batch.text_mask.bool()
        keep = self.sequences.text_keep(batch.text_ids, mask, strip_eos=False)
        fused = self.sequences.fuse(image_tokens, batch.text_ids, keep, batch.text_labels)
        _, logits, _ = self.adapter.lm_forward(fused.embeds, fused.attention_mask, return_logits=True)
        # Labels sit on their own token (HF convention); position i predicts token i + 1.
        labels = fused.labels[:, 1:]
        ce = F.cross_entropy(
            rearrange(logits[:, :-1].float(), "b l v -> (b l) v"),
            rearrange(labels, "b l -> (b l)"),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss_vl = ce / (labels != IGNORE_INDEX).sum().clamp(min=1)
        loss = self.cfg.loss_weights.vl * loss_vl
        # The action path, state encoder and CLIP projection are idle here: keep them in the graph (zero_sync).
        idle = self.actions.idle_outputs(self)
        if idle:
            loss = loss + zero_touch(*idle)
        if self.state_encoder is not None:
            loss = loss + zero_touch(self.state_encoder(torch.zeros(1, self.state_dim, device=image_tokens.device)))
        if self.clip_reg is not None:
            loss = loss + self.clip_reg.touch(image_tokens)
        if self.film is not None:
            loss = loss + self.film.touch()
        if self.keypoints is not None:
            loss = loss + zero_touch(self.keypoints(image_tokens[:1]))
        return {"loss": loss, "loss_vl": loss_vl, "num_tokens": fused.attention_mask.sum()}

    # --- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def predict_action(
        self,
        obs: Observation,
        generator: torch.Generator | None = None,
        guide: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images `[B, T, C, H, W]` → (normalised regressed chunk `[B, T', N, A-G]`, gripper probabilities
        `[B, T', N, G]`, G = binary_dims): T' = T, one chunk per frame (`post`, `pre`), or T' = 1, the last
        frame's chunk (`video`). `obs.state` `[B, T, S]` (normalised) is required when `model.use_state` is on.
        Head memory is neither used nor changed: an lstm/gpt head runs over the given window as in training (from
        a fresh state); `predict_action_step` is the stepwise path.

        Discrete: greedy KV-cached decoding of the A x N action ids; arm dims are bin centres and the
        gripper "probability" is hard, 1.0 when the decoded gripper bin is in the closed half, else 0.0.
        Flow: Euler sampling from noise drawn on `generator` (a CPU generator; None: the global RNG), gripper
        hard as for discrete; the other action spaces are deterministic and ignore it. `guide` (flow only):
        (normalised target `[N, A]`, row weights `[N]`), real-time chunking's inpainting (`flow.guided_euler_sample`).
        """
        if isinstance(self.actions, FlowActions):
            return self.actions.predict(self, obs, generator, guide)
        if guide is not None:
            raise ValueError("inpainting a chunk (guide) needs model.action_space: flow")
        return self.actions.predict(self, obs)

    @torch.no_grad()
    def decode_action_ids(self, obs: Observation, use_cache: bool = True) -> torch.Tensor:
        """Discrete action space: greedy action ids `[B, T', N, A]`, T' as in `predict_action` (`use_cache=False`
        is the slow reference); `pre` decodes frame by frame (T decodes). FAST tokens: `[B, T', K]`, K <= N x A,
        EOS after each row's tokens."""
        if not isinstance(self.actions, DiscreteActions):
            raise ValueError("decode_action_ids needs model.action_space: discrete")
        return self.actions.decode_ids(self, obs, use_cache)

    @property
    def stepwise(self) -> bool:
        """True when the head keeps per-episode memory (lstm / gpt, history `post`): call `predict_action_step`
        with one frame per control step (and `reset()` between episodes) instead of passing the window."""
        return isinstance(self.action_head, HistoryHead)

    def reset(self) -> None:
        """Start a new episode: clear the head's memory (nothing to clear for other heads)."""
        if isinstance(self.action_head, HistoryHead):
            self.action_head.reset()

    @torch.no_grad()
    def predict_action_step(self, obs: Observation) -> tuple[torch.Tensor, torch.Tensor]:
        """One control step with a history head: the current frame `[B, 1, C, H, W]` (state `[B, 1, S]`) →
        (arm `[B, 1, N, A-G]`, gripper probabilities `[B, 1, N, G]`), fused with the frames seen since `reset()`
        (the last `head.max_history`); equals `predict_action`'s last frame over that window."""
        if not self.stepwise or not isinstance(self.actions, ContinuousActions):
            raise ValueError(
                "predict_action_step needs model.head.type lstm or gpt; other heads take the window in predict_action"
            )
        return self.actions.predict_step(self, obs)


def build_model(
    cfg: ModelConfig,
    action_dim: int,
    state_dim: int,
    chunk_size: int = 1,
    torch_dtype: torch.dtype | str | None = None,
    load_clip: bool = True,
    binary_dims: int = 1,
    binary_state_dims: int = 1,
    device_map: str | dict | None = None,
    offload_folder: str | None = None,
    empty_weights: bool = False,
) -> RoboVLM:
    """Load the configured backbone through the registry (writing the tiny one first if configured) and wrap it.

    `chunk_size` is `data.fwd_pred_next_n`; the dims come from the dataset's declared spaces
    (`build_model(cfg, **manifest.robot_spaces.model_dims())`). Under ZeRO-3 create transformers' `HfDeepSpeedConfig`
    before calling this, so `from_pretrained` loads the backbone partitioned. With `model.clip_reg` on,
    the frozen CLIP text model is loaded whole (it is a training-only teacher); `load_clip=False` skips
    it for export and inference, where the regulariser's projection is kept only so weights load strictly.
    `device_map` / `offload_folder` place the backbone only (inference: `Policy.from_pretrained`).
    `empty_weights`: the backbone built on the meta device, for a caller that then loads every weight with
    `load_state_dict(..., assign=True)` (the export and the policy load), so its own checkpoint is never read.
    """
    clip_teacher = None
    if cfg.clip_reg.enabled and load_clip:
        ensure_tiny_clip(cfg.clip_reg)
        clip_teacher = ClipTextTeacher.from_pretrained(cfg.clip_reg.pretrained)
    backbone = cfg.backbone
    ensure_tiny_backbone(backbone)
    args = (backbone.family, backbone.pretrained, backbone.trust_remote_code, torch_dtype)
    if empty_weights:
        adapter = build_empty_backbone(*args)
    else:
        placement = {} if device_map is None else {"device_map": device_map, "offload_folder": offload_folder}
        adapter = load_backbone(*args, **placement)
    if backbone.gradient_checkpointing:
        adapter.enable_gradient_checkpointing()
    if cfg.lora.enabled:
        apply_lora(adapter.decoder_layers, cfg.lora)
    model = RoboVLM(cfg, action_dim, state_dim, adapter, chunk_size, clip_teacher, binary_dims, binary_state_dims)
    if backbone.gradient_checkpointing and hasattr(model.action_head, "gradient_checkpointing"):
        model.action_head.gradient_checkpointing = True  # history heads: recompute the time model too
    return model
