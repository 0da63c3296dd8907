"""Load an exported policy and turn camera frames + an instruction into robot actions.

The inputs go through the same code as training data: the instruction is tokenised and the
frames and state are batched by `collate_robot` (no special tokens, truncated to
`max_text_len`), and state is normalised with the dataset's `Normalizer`, so a policy
sees at inference exactly what it saw in training. Outputs are un-normalised into the
robot's units. Weights are read with safetensors only (no pickle).
"""

from __future__ import annotations

import tempfile
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from safetensors.torch import load_file

from vla_scale.config.load import config_section
from vla_scale.config.schema import ModelConfig
from vla_scale.data.collate import collate_robot
from vla_scale.data.format import load_stats
from vla_scale.data.normalize import Normalizer
from vla_scale.data.spaces import Spaces
from vla_scale.data.window import Window
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.flow import inpainting_weights
from vla_scale.model.lora import has_lora

EXPORT_FORMAT_VERSION = 1


@dataclass
class _Frame:
    """One step of the episode history: camera frames and the normalised state."""

    image: np.ndarray  # uint8 [H, W, 3]
    wrist: np.ndarray | None  # uint8 [H, W, 3]
    state: np.ndarray  # float32 [S]


BACKBONE_PREFIX = "adapter."  # the backbone's keys in RoboVLM's state dict


def _place(model: RoboVLM, device: torch.device | str, backbone_placed: bool) -> RoboVLM:
    """The whole model to `device`, or, when its backbone was placed by a device map, everything but the backbone
    (moving that would undo the map, and its offloaded weights are not in memory)."""
    if not backbone_placed:
        return model.to(device)
    for name, child in model.named_children():
        if name != "adapter":
            child.to(device)
    for tensor in [*model.parameters(recurse=False), *model.buffers(recurse=False)]:
        tensor.data = tensor.data.to(device)
    return model


def _check_image(image: object, name: str) -> np.ndarray:
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"{name} must be a uint8 [H, W, 3] RGB frame, got {arr.dtype} {arr.shape}")
    return arr


class Policy:
    """A trained RoboVLM plus what inference needs: tokenizer, normalisation stats, episode history."""

    def __init__(
        self,
        model: RoboVLM,
        normalizer: Normalizer,
        spec: dict,
        device: torch.device | str = "cpu",
        backbone_placed: bool = False,
    ):
        self.model = _place(model.eval(), device, backbone_placed)  # backbone_placed: by a device_map, left there
        self.normalizer = normalizer
        self.spec = spec
        self.device = torch.device(device)
        data = spec["data"]
        self.window_size = int(data["window_size"])
        self.chunk_size = int(data["fwd_pred_next_n"])
        self.max_text_len = int(data["max_text_len"])
        self.action_dim = int(data["action_dim"])
        self.state_dim = int(data["state_dim"])
        self.static_camera: str | None = data.get("static_camera")
        self.wrist_camera: str | None = data.get("wrist_camera")
        self._history: deque[_Frame] = deque(maxlen=self.window_size)
        self._generator: torch.Generator | None = None  # sampling noise (flow action space), seeded by reset
        self.model.reset()

    @property
    def can_inpaint(self) -> bool:
        """Whether `predict` takes a `prefix` (real-time chunking): the flow action space only."""
        return self.model.cfg.action_space == "flow"

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: torch.device | str | None = None,
        device_map: str | dict | None = None,
        offload_folder: str | Path | None = None,
    ) -> Policy:
        """Load an export folder (`vla-scale export`), or a run directory, which is first exported
        (its `latest` checkpoint) to a temporary folder that is removed once loaded.

        `device_map` ("auto", or {module name: GPU index / "cpu" / "disk"}, with `offload_folder` for "disk")
        places the backbone with accelerate, as transformers' `from_pretrained` does, for a backbone larger than
        one GPU; the heads and the inputs go to `device`. Needs an export with LoRA merged (the default).
        """
        path = Path(path)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        placement = {
            "device_map": device_map,
            "offload_folder": None if offload_folder is None else str(offload_folder),
        }
        if (path / "vla_config.yaml").is_file():
            return cls._load_export(path, device, **placement)
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            from vla_scale.train.export import export_policy

            with tempfile.TemporaryDirectory(prefix="vla_policy-") as tmp:
                return cls._load_export(export_policy(path, Path(tmp) / "policy"), device, **placement)
        raise FileNotFoundError(
            f"{path} is neither a policy export (no vla_config.yaml) nor a run directory with checkpoints; "
            "export one with `vla-scale export RUN_DIR OUT_DIR`"
        )

    @classmethod
    def _load_export(
        cls, folder: Path, device: torch.device | str, device_map: str | dict | None, offload_folder: str | None
    ) -> Policy:
        spec = yaml.safe_load((folder / "vla_config.yaml").read_text())
        if spec.get("format_version") != EXPORT_FORMAT_VERSION:
            raise ValueError(
                f"{folder}/vla_config.yaml has format_version {spec.get('format_version')}; this vla_scale reads "
                f"{EXPORT_FORMAT_VERSION}: re-export the run with this version"
            )
        model_cfg: ModelConfig = config_section(ModelConfig, spec["model"], "model")
        model_cfg.backbone.pretrained = str(folder / model_cfg.backbone.pretrained)
        if model_cfg.discrete.tokenizer == "fast":
            model_cfg.discrete.fast_path = str(folder / model_cfg.discrete.fast_path)
        data = spec["data"]
        # An export from before declared spaces has none: the legacy layout it was trained with.
        spaces = Spaces.from_json(data.get("spaces"), data["action_dim"], data["state_dim"], "vla_config.yaml")
        model = build_model(
            model_cfg,
            **spaces.model_dims(),
            chunk_size=data["fwd_pred_next_n"],
            load_clip=False,  # the CLIP regulariser's text model only teaches during training
            device_map=device_map,
            offload_folder=offload_folder,
            # Without a map, model.safetensors holds every weight: the backbone is built on the meta device and
            # those weights assigned, so backbone/'s copy of them is never read.
            empty_weights=device_map is None,
        )
        state = load_file(str(folder / "model.safetensors"))
        if device_map is not None:
            # backbone/ holds the same (merged) backbone weights, already placed by the map; offloaded ones are
            # not in memory at all, so only the rest is loaded here.
            if has_lora(model.adapter):
                raise ValueError(f"{folder}: device_map needs an export with LoRA merged (`vla-scale export` default)")
            state = {k: v for k, v in state.items() if not k.startswith(BACKBONE_PREFIX)}
            missing, unexpected = model.load_state_dict(state, strict=False)
            not_loaded = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]
            if not_loaded or unexpected:
                raise ValueError(f"{folder}/model.safetensors: missing {not_loaded}, unexpected {unexpected}")
        else:
            model.load_state_dict(state, strict=True, assign=True)
            model.adapter.model.tie_weights()  # assign replaced tied parameters by two equal copies: share again
        return cls(model, Normalizer(load_stats(folder), spaces), spec, device, backbone_placed=device_map is not None)

    def reset(self, seed: int | None = None) -> None:
        """Start a new episode: forget the frame/state history and the head's memory (lstm / gpt heads). A `seed`
        makes the episode's sampled chunks (flow action space) reproducible; None draws from torch's global RNG."""
        self._history.clear()
        self._generator = None if seed is None else torch.Generator().manual_seed(seed)
        self.model.reset()

    def _frames(self, image: np.ndarray | dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None]:
        if not isinstance(image, dict):
            return _check_image(image, "image"), None
        if self.static_camera not in image:
            raise KeyError(f"image dict has cameras {sorted(image)}; the policy needs {self.static_camera!r}")
        wrist = image.get(self.wrist_camera) if self.wrist_camera else None
        return _check_image(image[self.static_camera], self.static_camera), (
            None if wrist is None else _check_image(wrist, str(self.wrist_camera))
        )

    @torch.no_grad()
    def predict(
        self,
        image: np.ndarray | dict[str, np.ndarray],
        instruction: str,
        state: np.ndarray | None = None,
        seed: int | None = None,
        prefix: np.ndarray | None = None,
        prefix_delay: int = 0,
    ) -> np.ndarray:
        """One control step: uint8 frame `[H, W, 3]` (or `{camera: frame}`), instruction, raw state `[S]`
        → action chunk `[N, A]` in the robot's units and dimension order for the current step (binary gripper
        dims as the dataset declares them, by default 0 open / 1 closed).

        Real-time chunking (flow action space only): `prefix` `[P, A]` (raw, P <= N) is what the previous chunk
        still holds for this step and the next ones, `prefix_delay` how many of them will execute before this
        chunk arrives; the new chunk is inpainted to continue them (`flow.inpainting_weights`: those rows are
        held, the rest of the overlap eased in), so switching chunks does not jump.

        The frame and state join the episode history (last `window_size` steps); call `reset()` between episodes.
        Flow action space: the chunk is sampled from noise drawn with `seed` if given, else from the generator
        `reset(seed)` seeded (advancing per call), else from torch's global RNG; other action spaces ignore it.
        """
        static, wrist = self._frames(image)
        if self.wrist_camera and wrist is None:
            raise KeyError(f"the policy was trained with a wrist camera; pass {{..., {self.wrist_camera!r}: frame}}")
        if state is None:
            if self.model.state_encoder is not None:
                raise ValueError(f"this policy uses proprioceptive state: pass state [{self.state_dim}]")
            norm_state = np.zeros(self.state_dim, np.float32)
        else:
            state = np.asarray(state, dtype=np.float32)
            if state.shape != (self.state_dim,):
                raise ValueError(f"state must have shape [{self.state_dim}], got {state.shape}")
            norm_state = self.normalizer.normalize_state(state)
        self._history.append(_Frame(static, wrist, norm_state))
        # A history head (lstm / gpt) remembers the episode itself: it takes the current frame only.
        frames = list(self._history)[-1:] if self.model.stepwise else list(self._history)
        has_wrist = all(f.wrist is not None for f in frames)
        window = Window(
            key="policy",
            instruction=instruction,
            images=np.stack([f.image for f in frames]),
            wrist_images=np.stack([f.wrist for f in frames]) if has_wrist else None,
            state=np.stack([f.state for f in frames]),
            action=np.zeros((len(frames), self.chunk_size, self.action_dim), np.float32),
            action_mask=np.ones((len(frames), self.chunk_size), bool),
        )
        guide = None if prefix is None else self._inpainting(prefix, prefix_delay)
        batch = collate_robot([window], self.model.tokenizer, self.max_text_len).to(self.device)
        predict = self.model.predict_action_step if self.model.stepwise else self.model.predict_action
        if self.model.stepwise:
            arm, gripper = predict(batch.observation)
        else:
            generator = torch.Generator().manual_seed(seed) if seed is not None else self._generator
            arm, gripper = predict(batch.observation, generator, guide)
        # One chunk per frame given ("post" mlp, "pre"), or one for the last frame ("video", stepwise heads):
        # the last is the current step's.
        return self.normalizer.unnormalize_action(arm[0, -1].cpu().numpy(), gripper[0, -1].cpu().numpy())

    def _inpainting(self, prefix: np.ndarray, delay: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised target `[N, A]`, row weights `[N]`) for `predict`'s real-time chunking."""
        if not self.can_inpaint:
            space = self.model.cfg.action_space
            raise ValueError(f"prefix (real-time chunking) needs the flow action space, not {space}")
        prefix = np.asarray(prefix, dtype=np.float32)
        n, a = self.chunk_size, self.action_dim
        if prefix.ndim != 2 or prefix.shape[1] != a or not 1 <= len(prefix) <= n:
            raise ValueError(f"prefix must be [P, {a}] with 1 <= P <= {n}, got {list(prefix.shape)}")
        if not np.isfinite(prefix).all():
            raise ValueError("prefix holds NaN/inf")
        if not 0 <= delay <= len(prefix):
            raise ValueError(f"prefix_delay must be in [0, {len(prefix)}] (the prefix length), got {delay}")
        target = np.zeros((self.chunk_size, self.action_dim), np.float32)
        target[: len(prefix)] = self.normalizer.normalize_action(prefix)
        return torch.from_numpy(target), inpainting_weights(self.chunk_size, len(prefix), delay)
