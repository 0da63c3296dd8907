"""Tiny random-weight checkpoints for tests and the CPU demo, written once and loaded like real ones.

`build_tiny_backbone` makes a family's model from its real transformers config classes at the sizes
of `TinyBackboneConfig` (the per-family recipes are in `tiny_families.py`), wraps it in the family's
adapter and saves it with `save_pretrained`, so loading it takes the real `from_pretrained` path.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vla_scale.config.schema import BackboneConfig, TinyBackboneConfig, TinyClipConfig
from vla_scale.model.backbones.registry import get_backbone_class

if TYPE_CHECKING:
    from vla_scale.model.backbones.contract import BackboneAdapter


def build_tiny_backbone(
    family: str, tiny_cfg: TinyBackboneConfig, out_dir: str | os.PathLike, seed: int = 0
) -> BackboneAdapter:
    """Write a tiny random-weight checkpoint of `family` to `out_dir`; return the adapter in memory."""
    adapter_class = get_backbone_class(family)  # an unknown family fails here, with its close-match hint
    from vla_scale.model.backbones.tiny_families import TINY_BUILDERS  # imports every family's config classes

    if family not in TINY_BUILDERS:
        raise ValueError(f"backbone family {family!r} has no tiny builder; add one to tiny_families.TINY_BUILDERS")
    model, tokenizer, image_processor = TINY_BUILDERS[family](tiny_cfg, seed)
    adapter = adapter_class(model, tokenizer, image_processor)
    adapter.save_pretrained(out_dir)
    return adapter


def text_config_kwargs(
    sizes: TinyBackboneConfig | TinyClipConfig, tokenizer: Any, max_positions: int
) -> dict[str, Any]:
    """A tiny text stack's sizes and special ids under the names most HF text configs share (Llama, Gemma, Qwen2,
    CLIP text): one mapping of `model.backbone.tiny` and `model.clip_reg.tiny` onto those configs."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": sizes.hidden_size,
        "intermediate_size": sizes.intermediate_size,
        "num_hidden_layers": sizes.num_layers,
        "num_attention_heads": sizes.num_heads,
        "max_position_embeddings": max_positions,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def ensure_tiny_backbone(cfg: BackboneConfig, seed: int = 0) -> bool:
    """If `cfg.tiny` is set and `cfg.pretrained` is a missing folder, write the tiny checkpoint there.

    Written to a temporary sibling and renamed into place, so ranks racing on a shared
    filesystem never see a half-written folder. Returns True when this call wrote it.
    """
    if cfg.tiny is None or not cfg.pretrained:
        return False
    tiny = cfg.tiny
    recipe = {"family": cfg.family, "seed": seed, **dataclasses.asdict(tiny)}

    def build(tmp: Path) -> None:
        build_tiny_backbone(cfg.family, tiny, tmp, seed=seed)
        (tmp / TINY_RECIPE).write_text(json.dumps(recipe, indent=1, sort_keys=True))

    wrote = write_folder_once(cfg.pretrained, build)
    # The seed is recorded, not compared: callers that only load (build_model) pass the default.
    check_tiny_recipe(Path(cfg.pretrained), {k: v for k, v in recipe.items() if k != "seed"})
    return wrote


TINY_RECIPE = "vla_scale_tiny.json"  # what a tiny checkpoint was built from, written beside its weights


def check_tiny_recipe(folder: Path, recipe: dict[str, Any]) -> None:
    """Refuse a tiny checkpoint folder built from other sizes than `model.backbone.tiny` now asks for: reusing it
    silently would train another model than the config describes (e.g. after editing `tiny.patch_size`)."""
    marker = folder / TINY_RECIPE
    if not marker.is_file():
        return  # written before the recipe was recorded, or a real checkpoint: nothing to compare
    built = json.loads(marker.read_text())
    diff = {k: (built.get(k), v) for k, v in recipe.items() if built.get(k) != v}
    if diff:
        changes = ", ".join(f"{k}: {old!r} there, {new!r} in the config" for k, (old, new) in sorted(diff.items()))
        raise ValueError(
            f"model.backbone.pretrained={folder} holds a tiny checkpoint built from other settings ({changes}): "
            "delete that folder to rebuild it, or point model.backbone.pretrained at a new one"
        )


def write_folder_once(target: str | os.PathLike, build: Callable[[Path], Any]) -> bool:
    """Run `build(tmp)` into a temporary sibling of the missing folder `target` and rename it into place.

    Ranks racing on a shared filesystem never see a half-written folder; a build must be deterministic
    (same seed), since the loser's copy is discarded. Returns True when this call wrote `target`.
    """
    target = Path(target)
    if target.exists():
        return False
    torch = sys.modules.get("torch")  # not imported (`vla-scale prepare` avoids its cost): no process group either
    dist = torch.distributed if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        # transformers' save_pretrained writes weights on rank 0 only: this rank's copy would lack them.
        raise RuntimeError(
            f"{target} does not exist and rank {dist.get_rank()} cannot write it: write tiny checkpoints "
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
