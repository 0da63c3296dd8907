"""Export a trained run as a self-contained policy folder that `vla_scale.policy.Policy` loads.

DeepSpeed checkpoints hold the weights partitioned per rank (ZeRO) and next to optimizer
state; DeepSpeed's own `zero_to_fp32` reconstructs the full fp32 weights from them. The
export folder then needs nothing from the run or the original backbone path:

- `model.safetensors` — the whole RoboVLM state dict (fp32), the authoritative weights;
- `backbone/` — the backbone adapter's `save_pretrained`: HF config, tokenizer, image processor
  (and the fine-tuned VLM weights, so the folder is also a plain HF checkpoint of the VLM);
- `vla_config.yaml` — the model section plus the data settings inference needs;
- `stats.json` — the robot dataset's action/state normalisation statistics (with its declared spaces,
  `data.spaces` in `vla_config.yaml`: binary gripper dims, normalisation mode).
- `fast_tokenizer.json` — with `model.discrete.tokenizer: fast`, the FAST tokenizer the run trained with.

A LoRA run is exported merged by default (the adapters folded into plain layers; the folder
then needs no peft); with `merge_lora=False` the adapters stay separate: `model.safetensors`
holds them next to the base weights, `backbone/` holds the base weights only, and the policy
re-injects LoRA from `vla_config.yaml` when it loads.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import save_file

from vla_scale.config import Config, load_config, to_dict
from vla_scale.data.format import Manifest
from vla_scale.data.locations import dataset_file, is_remote
from vla_scale.data.stream import WRIST_CAMERA
from vla_scale.model import RoboVLM, build_model
from vla_scale.model.lora import base_state_dict, has_lora, merge_lora
from vla_scale.train import checkpoint

EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "vla_config.yaml"
STATS_FILE = "stats.json"
BACKBONE_DIR = "backbone"
FAST_FILE = "fast_tokenizer.json"  # `model.discrete.tokenizer: fast`: the fitted FAST tokenizer


class ExportError(RuntimeError):
    """A run that cannot be exported (no checkpoint, missing dataset); the message says what to do."""


def robot_manifest(cfg: Config) -> tuple[Path | str, Manifest]:
    """The first robot dataset of the run (a folder, or an s3://, http(s)://, pipe: location): its dims, cameras
    and stats define the policy's I/O."""
    for src in cfg.data.sources:
        manifest = Manifest.load(src.path)
        if manifest.kind == "robot":
            return (src.path if is_remote(src.path) else Path(src.path)), manifest
    raise ExportError("the run's config lists no robot dataset in data.sources; a policy needs one")


def resolve_tag(run_dir: Path, tag: str | None) -> str:
    """`tag` if given (must exist), else the run's `latest`; refuses a run without a checkpoint."""
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (no config.yaml); pass <run.output_dir>/<run.name>")
    ckpt_dir = run_dir / "checkpoints"
    if tag is None:
        tag = checkpoint.read_latest(ckpt_dir)
        if tag is None:
            raise ExportError(
                f"{run_dir} has no complete checkpoint ({ckpt_dir}/latest is missing): train it first, "
                "or with train.ckpt_every so a checkpoint is saved"
            )
    elif not (ckpt_dir / tag).is_dir():
        found = sorted(p.name for p in ckpt_dir.glob("step_*")) if ckpt_dir.is_dir() else []
        raise ExportError(f"checkpoint {ckpt_dir / tag} does not exist; available: {found or 'none'}")
    return tag


def load_fp32_state_dict(run_dir: str | Path, tag: str | None = None) -> dict[str, torch.Tensor]:
    """Full fp32 weights of a run's checkpoint, whatever ZeRO stage (0-3) and world size wrote it."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir = Path(run_dir)
    tag = resolve_tag(run_dir, tag)
    ckpt_dir = run_dir / "checkpoints"
    model_file = ckpt_dir / tag / "mp_rank_00_model_states.pt"  # ZeRO 0-2 (ZeRO-3 names its files per rank)
    state: dict[str, torch.Tensor] = {}
    if model_file.is_file():
        module = torch.load(model_file, map_location="cpu", weights_only=True)["module"]
        state = {k: v.float() for k, v in module.items() if v.numel() > 0}
    if any((ckpt_dir / tag).glob("*optim_states.pt")):
        # The fp32 masters of the trained parameters. Parameters frozen by the stage or by LoRA have no
        # master; ZeRO-2/3 record them beside the partitions, bf16 ZeRO-1 does not, and then their values
        # come from the module file above, where they sit untouched since loading.
        masters = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        state.update({k: v.float() for k, v in masters.items()})
    if not state:
        raise ExportError(f"{ckpt_dir / tag} holds neither ZeRO optimizer partitions nor {model_file.name}")
    return state


def build_run_model(run_dir: str | Path, tag: str | None = None) -> tuple[RoboVLM, Config]:
    """The run's RoboVLM with the checkpoint's fp32 weights loaded strictly (on CPU, eval mode)."""
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    _, manifest = robot_manifest(cfg)
    state = load_fp32_state_dict(run_dir, tag)
    # The CLIP regulariser's frozen text model is a training-only teacher: not in the weights, not needed here.
    # The checkpoint holds every weight, so the backbone is built on the meta device (its pretrained weights, which
    # the checkpoint replaces, are never read) and the checkpoint's tensors assigned.
    model = build_model(
        cfg.model,
        **manifest.robot_spaces.model_dims(),
        chunk_size=cfg.data.fwd_pred_next_n,
        load_clip=False,
        empty_weights=True,
    )
    model.load_state_dict(state, strict=True, assign=True)
    model.adapter.model.tie_weights()  # assign replaced tied parameters by two equal copies: share again
    return model.eval(), cfg


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied weights): give later aliases their own copy."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for key, value in state.items():
        ident = (value.untyped_storage().data_ptr(), value.storage_offset())
        out[key] = value.clone().contiguous() if ident in seen else value.contiguous()
        seen.add(ident)
    return out


def policy_spec(cfg: Config, manifest: Manifest, tag: str, lora_merged: bool = False) -> dict:
    """What `vla_config.yaml` holds: the model section (backbone pointing at `backbone/`) + inference data settings."""
    model = to_dict(cfg)["model"]
    model["backbone"].update(pretrained=BACKBONE_DIR, tiny=None, gradient_checkpointing=False)
    if lora_merged:
        model["lora"]["enabled"] = False
    if model["discrete"]["tokenizer"] == "fast":
        model["discrete"]["fast_path"] = FAST_FILE  # copied into the export, resolved against it by the Policy
    static = [c for c in manifest.cameras if c != WRIST_CAMERA]
    return {
        "format_version": EXPORT_FORMAT_VERSION,
        "model": model,
        "data": {
            "window_size": cfg.data.window_size,
            "fwd_pred_next_n": cfg.data.fwd_pred_next_n,
            "max_text_len": cfg.data.max_text_len,
            "action_dim": manifest.action_dim,
            "state_dim": manifest.state_dim,
            # the declared spaces the stats.json below normalise with ({} = legacy layout); read by the Policy
            "spaces": manifest.robot_spaces.to_json(),
            "cameras": list(manifest.cameras),
            "static_camera": static[0] if static else None,
            "wrist_camera": WRIST_CAMERA if WRIST_CAMERA in manifest.cameras else None,
        },
        "source": {"run": cfg.run.name, "tag": tag},
    }


def _save_backbone(model: RoboVLM, out_dir: Path) -> None:
    """The adapter's HF folder; with LoRA kept, only the base weights under their original names."""
    adapter = model.adapter
    if not has_lora(adapter):
        adapter.save_pretrained(out_dir)
        return
    adapter.model.save_pretrained(out_dir, state_dict=base_state_dict(adapter.model.state_dict()))
    adapter.tokenizer.save_pretrained(out_dir)
    adapter.image_processor.save_pretrained(out_dir)


def export_policy(
    run_dir: str | Path, out_dir: str | Path, tag: str | None = None, merge_lora_adapters: bool = True
) -> Path:
    """Write the policy folder for `run_dir`'s checkpoint `tag` (default `latest`) to `out_dir`; returns it.

    Written into a temporary sibling and renamed, so a failed export never leaves a half folder.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    tag = resolve_tag(run_dir, tag)
    model, cfg = build_run_model(run_dir, tag)
    merged = merge_lora_adapters and merge_lora(model.adapter) > 0
    data_dir, manifest = robot_manifest(cfg)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} exists and is not empty; choose a new export folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(_unshared(model.state_dict()), str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        _save_backbone(model, tmp / BACKBONE_DIR)
        spec = policy_spec(cfg, manifest, tag, lora_merged=merged)
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(spec, sort_keys=False))
        (tmp / STATS_FILE).write_text(dataset_file(data_dir, STATS_FILE).read_text())
        if cfg.model.discrete.tokenizer == "fast":
            shutil.copyfile(cfg.model.discrete.fast_path, tmp / FAST_FILE)
        tmp.chmod(0o755)  # mkdtemp makes it private; the export is meant to be shared
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
