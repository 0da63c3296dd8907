"""GPU training throughput, MFU and peak memory of a ~3B PaliGemma policy, bf16, ZeRO-2 and ZeRO-3 (a script).

Why: the CPU benchmarks show where time goes relative to DeepSpeed itself; this one says what a
GPU gets out of the whole stack, data loading included. Target: MFU >= 45% on an H100.

What runs, on every visible GPU (one rank each, NCCL):
- a PaliGemma-3B policy built from the real config classes at the real sizes of
  `google/paligemma-3b-pt-224` (SigLIP-So400m/14 at 224 px, 27 x 1152; Gemma-2B, 18 x 2048, MQA,
  vocabulary 257,216), random weights, saved and loaded back with `from_pretrained` as a
  downloaded checkpoint would be (no network needed; the tokenizer is the tiny offline one);
- `configs/paligemma_3b.yaml` (bf16, gradient checkpointing, state token, micro batch 16, 8 loader
  workers) with the data replaced by a `data_tools.synth` robot dataset at 224 px, read from shards,
  and its unfreezing schedule by one stage that trains everything (full fine-tuning: the heaviest
  step, and the one MFU is usually quoted for);
- the real `vla_scale.train.loop.train()` in spawned ranks (as `launchers/train.sh` would start
  them), except that the end-of-run checkpoint is skipped: it would time the disk, and a 3B
  model's ZeRO checkpoint is ~40 GB.

Figures come from the run's own `metrics.jsonl` (samples/s, tokens/s, data_wait_frac,
peak_mem_gb), over the logging windows after the warm-up.

MFU = model FLOPs per second / (peak dense bf16 FLOP/s x GPUs). Model FLOPs per sample, counted
as 6 x parameters x tokens that parameter set actually processes (forward 2, backward 4), plus
attention scores (PaLM's 12 x layers x width x sequence per token, no discount for causality):
- language model: 6 x decoder-layer parameters per LM position (tokens_per_s counts attended LM
  positions: image tokens, state, instruction, action token, BOS/EOS);
- vision tower + projector: 6 x their parameters per image patch, 256 patches per 224 px frame;
- not counted: the embedding lookup (no FLOPs), lm_head (robot batches project one token), the
  action head (one token), and the recomputation of checkpointed activations (that is hardware
  FLOPs, not model FLOPs). "6*N*T" in the table is the looser habit of 6 x all parameters x LM tokens.

    python tests/benchmarks/gpu_throughput.py                    # on a GPU machine
    python tests/benchmarks/gpu_throughput.py --peak-tflops 989  # peak for a GPU it does not know
    python tests/benchmarks/gpu_throughput.py --smoke            # CPU, tiny sizes, 2 steps: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from bench_common import REPO, command_line, median, patched, quiet_libraries, run_ranks, table
from transformers import (
    GemmaConfig,
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from data_tools.synth import synth
from vla_scale.model.backbones.paligemma import PaliGemmaAdapter, force_causal
from vla_scale.model.backbones.tiny_tokenizer import build_tiny_tokenizer
from vla_scale.train import checkpoint, loop
from vla_scale.train.metrics import read_metrics
from vla_scale.train.prepare import prepare_run

# Dense bf16 tensor-core peaks (TFLOP/s) by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0))
MFU_TARGET = 0.45


@dataclass(frozen=True)
class Sizes:
    """The PaliGemma dimensions that set parameter count and FLOPs."""

    vision_hidden: int
    vision_intermediate: int
    vision_layers: int
    vision_heads: int
    patch: int
    image: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


# google/paligemma-3b-pt-224's config.json.
PALIGEMMA_3B = Sizes(1152, 4304, 27, 16, 14, 224, 2048, 16384, 18, 8, 1, 256, 257216)
SMOKE = Sizes(32, 64, 1, 2, 8, 32, 64, 128, 2, 2, 1, 32, 512)


def paligemma_config(sizes: Sizes, tokenizer: Any) -> PaliGemmaConfig:
    """The family's real config classes at `sizes`, causal as `PaliGemmaAdapter` loads it."""
    vision = SiglipVisionConfig(
        hidden_size=sizes.vision_hidden,
        intermediate_size=sizes.vision_intermediate,
        num_hidden_layers=sizes.vision_layers,
        num_attention_heads=sizes.vision_heads,
        image_size=sizes.image,
        patch_size=sizes.patch,
        vision_use_head=False,
    )
    vocab = max(sizes.vocab, len(tokenizer))
    text = GemmaConfig(
        vocab_size=vocab,
        hidden_size=sizes.hidden,
        intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers,
        num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim,
        max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return force_causal(
        PaliGemmaConfig(
            vision_config=vision,
            text_config=text,
            image_token_index=tokenizer.convert_tokens_to_ids(tokenizer.image_token),
            vocab_size=vocab,
            projection_dim=sizes.hidden,
            hidden_size=sizes.hidden,
        )
    )


def count_parameters(config: PaliGemmaConfig) -> dict[str, int]:
    """Parameters by part, from a model on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        model = PaliGemmaForConditionalGeneration(config)

    def n(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    inner = model.model
    return {
        "total": n(model),
        "decoder_layers": n(inner.language_model.layers),
        "vision_tower": n(inner.vision_tower),
        "projector": n(inner.multi_modal_projector),
        "embeddings": n(model.get_input_embeddings()),
    }


def build_backbone_job(rank: int, world: int, sizes: dict, out_dir: str) -> dict[str, int]:
    """Write the random-weight checkpoint (in a spawned process, so the parent never holds GPU memory)."""
    quiet_libraries()
    tokenizer = build_tiny_tokenizer(pad="<pad>", bos="<bos>", eos="<eos>")
    config = paligemma_config(Sizes(**sizes), tokenizer)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        model = PaliGemmaForConditionalGeneration(config)
    if device == "cuda":
        model = model.to(torch.bfloat16)  # half the bytes to write and read; training loads it as a real one
    image_processor = SiglipImageProcessorPil(size={"height": sizes["image"], "width": sizes["image"]})
    PaliGemmaAdapter(model.eval(), tokenizer, image_processor).save_pretrained(out_dir)
    return count_parameters(config)


def train_job(rank: int, world: int, run_dir: str) -> dict[str, Any]:
    """One rank of `train(run_dir)` without the final checkpoint; returns this rank's device and peak memory."""
    quiet_libraries()
    with patched(checkpoint, "save", lambda *args, **kwargs: None):
        loop.train(run_dir)
    if not torch.cuda.is_available():
        return {"device": "cpu"}
    return {
        "device": torch.cuda.get_device_name(),
        "max_allocated_gb": torch.cuda.max_memory_allocated() / 2**30,
        "max_reserved_gb": torch.cuda.max_memory_reserved() / 2**30,
    }


def run_overrides(args: argparse.Namespace, work: Path, zero: int, world: int) -> list[str]:
    """configs/paligemma_3b.yaml pointed at the synthetic shards and the saved backbone."""
    return [
        f"run.output_dir={work / 'runs'}",
        f"run.name=zero{zero}",
        f"data.sources=[{{path: {work / 'data' / 'robot'}, weight: 1.0}}]",
        f"data.num_workers={args.workers}",
        f"data.shuffle_buffer={args.shuffle_buffer}",
        f"model.backbone.pretrained={work / 'backbone'}",
        "train.stages=[]",  # one stage training everything, not the recipe's heads-first schedule
        f"train.zero_stage={zero}",
        "train.bf16=true",
        f"train.micro_batch_size={args.micro_batch}",
        f"train.global_batch_size={args.micro_batch * world * args.accum}",
        f"train.max_steps={args.warmup_steps + args.steps}",
        f"train.log_every={args.log_every}",
        "train.ckpt_every=0",
        "wandb.mode=disabled",
    ]


def after_warmup(records: list[dict], warmup: int) -> list[dict]:
    """Metrics records whose logging window starts after the warm-up steps."""
    starts = [0] + [r["step"] for r in records[:-1]]
    return [r for start, r in zip(starts, records, strict=True) if start >= warmup]


def model_flops(params: dict[str, int], sizes: Sizes, samples_s: float, tokens_s: float) -> tuple[float, float]:
    """(model FLOP/s as counted in the module docstring, 6 x all parameters x LM tokens per second)."""
    seq = tokens_s / samples_s  # LM positions per sample (one sequence per sample with window 1)
    per_token = 6 * params["decoder_layers"] + 12 * sizes.layers * sizes.heads * sizes.head_dim * seq
    patches = (sizes.image // sizes.patch) ** 2
    vision = params["vision_tower"] + params["projector"]
    per_image = 6 * vision * patches + 12 * sizes.vision_layers * sizes.vision_hidden * patches * patches
    return tokens_s * per_token + samples_s * per_image, 6 * params["total"] * tokens_s


def peak_tflops(device: str, given: float | None) -> float | None:
    if given is not None:
        return given
    return next((peak for name, peak in PEAK_TFLOPS if name in device), None)


def prepare_inputs(args: argparse.Namespace, work: Path, sizes: Sizes) -> dict[str, int]:
    """Backbone checkpoint and shards, reused from `--work` when built for the same sizes; returns parameter counts."""
    marker, wanted = work / "inputs.json", {"sizes": asdict(sizes), "episodes": args.episodes}
    if marker.is_file() and json.loads(marker.read_text())["inputs"] == wanted:
        return json.loads(marker.read_text())["parameters"]
    for folder in ("backbone", "data"):
        shutil.rmtree(work / folder, ignore_errors=True)
    counts = run_ranks(build_backbone_job, 1, asdict(sizes), str(work / "backbone"))[0]
    synth(
        work / "data",
        episodes=args.episodes,
        vl_samples=0,
        image_size=sizes.image,
        episodes_per_shard=8,
        workers=min(8, os.cpu_count() or 1),
        progress=False,
    )
    marker.write_text(json.dumps({"inputs": wanted, "parameters": counts}))
    return counts


def report(args: argparse.Namespace, sizes: Sizes, params: dict[str, int], rows_in: list[dict], world: int) -> None:
    device = rows_in[0]["ranks"][0]["device"]
    peak = peak_tflops(device, args.peak_tflops)
    print(
        f"\n{device} x {world}; PaliGemma {'3B (real sizes)' if not args.smoke else 'smoke (tiny sizes)'}: "
        f"{params['total']:,} parameters (decoder layers {params['decoder_layers']:,}, vision tower "
        f"{params['vision_tower']:,}, projector {params['projector']:,}, embeddings {params['embeddings']:,}); "
        f"bf16, micro batch {args.micro_batch} x accum {args.accum}, {sizes.image} px, {args.workers} loader workers; "
        f"{args.warmup_steps} warm-up + {args.steps} timed steps; peak {peak or 'unknown'} TFLOP/s per device"
    )
    rows = []
    for run in rows_in:
        recs = run["records"]
        samples, tokens = median([r["samples_per_s"] for r in recs]), median([r["tokens_per_s"] for r in recs])
        flops, loose = model_flops(params, sizes, samples, tokens)
        mfu = f"{flops / (peak * 1e12 * world):.1%}" if peak else "n/a"
        mfu_loose = f"{loose / (peak * 1e12 * world):.1%}" if peak else "n/a"
        allocated = max(r.get("max_allocated_gb", 0.0) for r in run["ranks"])
        reserved = max(r.get("max_reserved_gb", 0.0) for r in run["ranks"])
        rows.append(
            [
                f"ZeRO-{run['zero']}",
                f"{samples:.1f}",
                f"{tokens:,.0f}",
                f"{tokens / samples:.0f}",
                f"{flops / 1e12:.3g}",
                mfu,
                mfu_loose,
                f"{median([r['data_wait_frac'] for r in recs]):.3f}",
                f"{max(r['peak_mem_gb'] for r in recs):.1f}",
                f"{allocated:.1f} / {reserved:.1f}",
            ]
        )
        run["mfu"] = flops / (peak * 1e12 * world) if peak else None
    header = [
        "ZeRO",
        "samples/s",
        "tokens/s",
        "tok/sample",
        "TFLOP/s",
        "MFU",
        "6*N*T MFU",
        "data_wait",
        "peak GB (log)",
        "alloc / reserved GB",
    ]
    print(table(header, rows))
    print(
        "(medians over logging windows; tokens = attended LM positions, all ranks; peak GB (log) = the run's "
        "peak_mem_gb, rank 0; alloc / reserved = torch.cuda max over ranks)"
    )
    if "H100" in device:
        for run in rows_in:
            verdict = "met" if run["mfu"] >= MFU_TARGET else "MISSED"
            print(f"ZeRO-{run['zero']}: MFU {run['mfu']:.1%}, target >= {MFU_TARGET:.0%}: {verdict}")
    else:
        print(f"MFU target (>= {MFU_TARGET:.0%}) is defined on an H100; this run is on {device}: not checked")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny sizes, 2 steps: proves the script end to end")
    p.add_argument("--zero", type=int, nargs="+", default=[2, 3], help="ZeRO stages (default: 2 3)")
    p.add_argument("--gpus", type=int, default=None, help="ranks (default: all visible GPUs; 2 CPU ranks in smoke)")
    p.add_argument("--micro-batch", type=int, default=None, help="per GPU (default: 16, the recipe's; smoke 2)")
    p.add_argument("--accum", type=int, default=1, help="gradient accumulation steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps (default: 10; smoke 0)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default: 30; smoke 2)")
    p.add_argument("--log-every", type=int, default=None, help="steps per logging window (default: 5; smoke 1)")
    p.add_argument("--workers", type=int, default=None, help="loader workers per rank (default: 8; smoke 1)")
    p.add_argument("--shuffle-buffer", type=int, default=None, help="windows per worker (default: 2048; smoke 16)")
    p.add_argument("--episodes", type=int, default=None, help="synthetic episodes (default: 128; smoke 16)")
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak per device, if not known")
    p.add_argument("--work", help="folder for the backbone, shards and runs, reused if present (default: temp)")
    args = p.parse_args()
    smoke = args.smoke
    defaults = dict(
        micro_batch=(16, 2),
        warmup_steps=(10, 0),
        steps=(30, 2),
        log_every=(5, 1),
        workers=(8, 1),
        shuffle_buffer=(2048, 16),
        episodes=(128, 16),
    )
    for key, (gpu, cpu) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, cpu if smoke else gpu)
    print("command:", command_line())
    if not smoke and not torch.cuda.is_available():
        sys.exit(
            "gpu_throughput.py needs CUDA GPUs and none is visible here; run it on a GPU machine, or pass --smoke "
            "to check the script end to end on CPU at tiny sizes"
        )
    world = args.gpus or (2 if smoke else torch.cuda.device_count())
    threads = max(1, (os.cpu_count() or 1) // world) if not smoke else 1
    sizes = SMOKE if smoke else PALIGEMMA_3B
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="gpu_throughput_") as tmp_name:
        work = Path(args.work) if args.work else Path(tmp_name)
        params = prepare_inputs(args, work, sizes)
        runs = []
        for zero in args.zero:
            shutil.rmtree(work / "runs" / f"zero{zero}", ignore_errors=True)  # a fresh run, not a resume
            run_dir = prepare_run(REPO / "configs" / "paligemma_3b.yaml", run_overrides(args, work, zero, world), world)
            ranks = run_ranks(train_job, world, str(run_dir), threads_per_rank=threads)
            runs.append(
                {"zero": zero, "ranks": ranks, "records": after_warmup(read_metrics(run_dir), args.warmup_steps)}
            )
            print(f"  done: ZeRO-{zero}", flush=True)
    report(args, sizes, params, runs, world)


if __name__ == "__main__":
    main()
