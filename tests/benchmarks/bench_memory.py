"""Per-rank model + gradient + optimizer memory under ZeRO 0-3 at 1, 2, 4 ranks and across a stage switch (a script).

Why: ZeRO's promise is that adding ranks divides what each rank holds (stage 1: optimizer
state, stage 2: + gradients, stage 3: + parameters), and staged unfreezing promises optimizer
state only for what the current stage trains. This checks both on the real engine factory
(`vla_scale.train.engine.build_engine`, as the loop calls it) with a 50-100M-parameter RoboVLM.

Bytes are counted structurally on each rank, after one optimizer step and the next step's
backward (gradients present, optimizer state allocated): every tensor storage the rank holds,
counted once, in the first category that claims it:

- params: the module's parameter storage (ZeRO-3: its partitions `ds_tensor`, plus parameters
  it keeps whole, below `stage3_param_persistence_threshold`);
- master: the tensors the base optimizer updates when they are not the module's parameters
  (the fp32 master copies, partitioned under ZeRO);
- optim: the base optimizer's state (AdamW's two moments, 8 bytes per trained element);
- grads: the module parameters' `.grad`, the master copies' `.grad`, and every tensor DeepSpeed's
  optimizer wrapper holds under an attribute whose name contains "grad"; tensors it holds under a
  name with "fp32" or "master" count as master (ZeRO-3 hands them to the base optimizer only
  while it steps);
- buffers (not in the total): any other tensor the wrapper holds, e.g. ZeRO-3's reduce buckets
  sized by `reduce_bucket_size`; `torch.empty`, so mostly never touched on CPU.

Secondary figures: RSS growth since before the model was built (it includes activations, the
allocator's cache and Python objects, and on CPU misses untouched pages), and the bytes of every
tensor storage the rank's Python objects still reach (a leak across engine rebuilds would show there).

    python tests/benchmarks/bench_memory.py                    # bf16, ZeRO 0-3 x 1, 2, 4 ranks + stage switch
    python tests/benchmarks/bench_memory.py --dtype fp32 --ranks 1 2 --tables zero
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from bench_common import REPO, command_line, quiet_libraries, rss_mb, run_ranks, table
from torch import nn
from transformers.integrations import HfDeepSpeedConfig

from data_tools.synth import synth
from vla_scale.config import load_config, save_config
from vla_scale.model import build_model
from vla_scale.model.backbones.base import ensure_tiny_backbone
from vla_scale.train.ds_config import build_ds_config
from vla_scale.train.engine import StagedEngine, build_engine, init_distributed
from vla_scale.train.stages import resolve_stages
from vla_scale.train.state import robot_dims, run_dataloader, seed_everything

CATEGORIES = ("params", "grads", "master", "optim")
STAGES = (
    "train.stages=[{start_step: 0, trainable: [heads]}, {start_step: 1, trainable: [heads, decoder_last_2]},"
    " {start_step: 2, trainable: [all]}]"
)
FRESH = "train.stages=[{start_step: 0, trainable: [all]}]"
STAGE_NAMES = ("heads", "+ decoder_last_2", "all")
MB = 2**20


class Ledger:
    """Bytes per category, each tensor storage counted once (views into one flat buffer share a storage)."""

    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = defaultdict(int)
        self.where: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    def add(self, category: str, tensor: torch.Tensor | None, where: str) -> None:
        if tensor is None or not torch.is_tensor(tensor):
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()
        self.where[category][where] += storage.nbytes()


def wrapper_tensors(obj: Any, path: str, depth: int, visited: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors reachable from DeepSpeed's optimizer wrapper through containers and DeepSpeed objects.

    Modules and torch optimizers are not entered: the module's parameters and the base optimizer
    are accounted for directly. Attribute paths keep only names (list indices are dropped).
    """
    if id(obj) in visited or depth < 0:
        return
    visited.add(id(obj))
    if torch.is_tensor(obj):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, dict):
        items = [(path, v) for v in obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        items = [(path, v) for v in obj]
    elif isinstance(obj, (nn.Module, torch.optim.Optimizer)) or not type(obj).__module__.startswith("deepspeed"):
        return
    else:
        items = [(f"{path}.{k}".lstrip("."), v) for k, v in vars(obj).items()]
    for sub_path, value in items:
        yield from wrapper_tensors(value, sub_path, depth - 1, visited)


def account(engine: Any, model: nn.Module, base_optimizer: torch.optim.Optimizer) -> Ledger:
    """What this rank holds now, by category (see the module docstring for the rules)."""
    ledger = Ledger()
    for p in model.parameters():
        ledger.add("params", p.data, "module parameters")
        ledger.add("params", getattr(p, "ds_tensor", None), "ds_tensor (ZeRO-3 partitions)")
    masters = [p for group in base_optimizer.param_groups for p in group["params"]]
    for p in masters:
        ledger.add("master", p.data, type(base_optimizer).__name__ + ".param_groups")
    for state in base_optimizer.state.values():
        for key, value in state.items():
            ledger.add("optim", value, f"optimizer.state[{key}]")
    for p in model.parameters():
        ledger.add("grads", p.grad, "module .grad")
    for p in masters:
        ledger.add("grads", p.grad, "master .grad")
    wrapper = engine.optimizer
    if wrapper is not base_optimizer:
        for path, tensor in wrapper_tensors(wrapper, "", depth=5, visited=set()):
            name, low = f"{type(wrapper).__name__}.{path}", path.lower()
            category = "grads" if "grad" in low else "master" if "fp32" in low or "master" in low else "buffers"
            ledger.add(category, tensor, name)
    return ledger


def live_tensor_bytes() -> int:
    """Every tensor storage Python can still reach in this process, counted once: a leak check across rebuilds."""
    gc.collect()
    seen: set[int] = set()
    total = 0
    with warnings.catch_warnings():  # isinstance() on some lazily imported objects warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in tensors:
        if obj.device.type == "meta":
            continue
        storage = obj.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


def one_step(engine: Any, batches: Iterator) -> None:
    out = engine(next(batches).to(engine.device))
    engine.backward(out["loss"])
    engine.step()


def load_run(run_dir: str, zero: int, world: int, extra: tuple[str, ...] = ()) -> tuple[Any, dict]:
    """The prepared config with this job's ZeRO stage and world size (global batch = micro batch x ranks)."""
    cfg = load_config(Path(run_dir) / "config.yaml", [f"train.zero_stage={zero}", *extra])
    cfg.train.global_batch_size = cfg.train.micro_batch_size * world
    return cfg, build_ds_config(cfg, world)


def build(cfg: Any, ds_config: dict, rank: int, world: int) -> tuple[nn.Module, Iterator]:
    """Model as the loop builds it (partitioned at load under ZeRO-3) and an endless batch iterator."""
    seed_everything(cfg.run.seed)
    action_dim, state_dim = robot_dims(cfg)
    hf_ds_config = HfDeepSpeedConfig(ds_config) if cfg.train.zero_stage == 3 else None
    model = build_model(cfg.model, action_dim=action_dim, state_dim=state_dim, chunk_size=cfg.data.fwd_pred_next_n)
    model._bench_hf_ds_config = hf_ds_config  # keep it alive as long as the model (the loop keeps it for the run)
    loader = run_dataloader(cfg, rank, world, model.tokenizer)
    return model, iter(loader)


def rank_zero_job(rank: int, world: int, run_dir: str, zero: int, explain: bool) -> dict:
    """One (ZeRO stage, world size) cell: build, one step, the next backward, then count."""
    quiet_libraries()
    cfg, ds_config = load_run(run_dir, zero, world)
    init_distributed(cfg.train.process_group_timeout_s)
    rss0 = rss_mb()
    model, batches = build(cfg, ds_config, rank, world)
    engine, optimizer = build_engine(model, cfg, ds_config)
    one_step(engine, batches)
    out = engine(next(batches).to(engine.device))
    engine.backward(out["loss"])
    ledger = account(engine, model, optimizer)
    result = {"bytes": dict(ledger.bytes), "rss_mb": rss_mb() - rss0, "live": live_tensor_bytes()}
    if explain:
        result["where"] = {k: dict(v) for k, v in ledger.where.items()}
    engine.step()
    engine.destroy()
    return result


def rank_stage_job(rank: int, world: int, run_dir: str, zero: int, stages: str) -> list[dict]:
    """Staged unfreezing as the loop does it: at each switch engine.destroy(), then start_stage (apply + build).

    Measured after each stage's first step; `live - accounted` is tensor memory no engine part explains.
    """
    quiet_libraries()
    cfg, ds_config = load_run(run_dir, zero, world, (stages,))
    init_distributed(cfg.train.process_group_timeout_s)
    rss0 = rss_mb()
    model, batches = build(cfg, ds_config, rank, world)
    reports = []
    staged = StagedEngine(model, cfg, ds_config, resolve_stages(model, cfg), rank)
    for stage in staged.stages:
        staged.enter(stage)  # the loop's stage switch: destroy, unhook, collect, apply the stage, rebuild
        engine, optimizer = staged.engine, staged.optimizer
        one_step(engine, batches)
        report = staged.report_stage(step=1)
        ledger = account(engine, model, optimizer)
        reports.append(
            {
                "stage": stage.index,
                "trainable": report["trainable_params"],
                "optim": ledger.bytes["optim"],
                "master": ledger.bytes["master"],
                "accounted": sum(ledger.bytes[c] for c in CATEGORIES) + ledger.bytes["buffers"],
                "live": live_tensor_bytes(),
                "rss_mb": rss_mb() - rss0,
            }
        )
    engine.destroy()
    return reports


def zero_table(args: argparse.Namespace, run_dir: str) -> None:
    """ZeRO 0-3 x ranks: per-rank bytes by category (rank 0; ranks differ by padding only) and the stage-3 check."""
    rows, totals = [], {}
    for zero in args.zero:
        for world in args.ranks:
            results = run_ranks(rank_zero_job, world, run_dir, zero, args.explain)
            r0 = results[0]
            parts = {c: r0["bytes"].get(c, 0) / MB for c in CATEGORIES}
            total = sum(parts.values())
            totals[zero, world] = total
            spread = max(sum(r["bytes"].get(c, 0) for c in CATEGORIES) for r in results) / MB - total
            frac = total / totals[zero, args.ranks[0]] if (zero, args.ranks[0]) in totals else float("nan")
            rows.append(
                [
                    f"ZeRO-{zero}",
                    world,
                    *(f"{parts[c]:.1f}" for c in CATEGORIES),
                    f"{total:.1f}",
                    f"{frac:.3f}",
                    f"{r0['bytes'].get('buffers', 0) / MB:.1f}",
                    f"{r0['live'] / MB:.0f}",
                    f"{max(r['rss_mb'] for r in results):.0f}",
                    f"{spread:+.1f}",
                ]
            )
            print(f"  done: ZeRO-{zero} x {world} ranks", flush=True)
            if args.explain:
                for cat, where in sorted(r0["where"].items()):
                    for name, n in sorted(where.items(), key=lambda kv: -kv[1]):
                        print(f"    {cat:8s} {n / MB:9.1f} MiB  {name}")
    print()
    header = [
        "ZeRO",
        "ranks",
        "params",
        "grads",
        "master",
        "optim",
        "total MiB",
        "vs 1 rank",
        "buffers",
        "live",
        "RSS +MiB",
        "max-r0",
    ]
    print(table(header, rows))
    print(
        "(per rank, rank 0; MiB = 2^20 B. 'vs 1 rank' = total / the same stage's total at "
        f"{args.ranks[0]} rank(s); buffers: not in the total; live: every tensor storage the rank can reach; "
        "'max-r0' = largest rank total minus rank 0's)"
    )
    if 3 in args.zero and args.ranks[0] == 1:
        print("\nZeRO-3 target: per-rank total at N ranks <= (1/N + 0.10) x the 1-rank total")
        for world in args.ranks[1:]:
            frac = totals[3, world] / totals[3, 1]
            verdict = "met" if frac <= 1 / world + 0.10 else "MISSED"
            print(f"  N={world}: {frac:.3f} of 1 rank (ideal {1 / world:.3f}, limit {1 / world + 0.10:.3f}): {verdict}")


def stage_table(args: argparse.Namespace, run_dir: str) -> None:
    """Per-rank optimizer state at each stage of heads -> heads + decoder_last_2 -> all, ZeRO-2 and ZeRO-3,
    and the same "all" stage built fresh, so memory kept from earlier stages' engines would show."""
    rows = []
    for zero in (2, 3):
        for how, stages in (("switched", STAGES), ("fresh", FRESH)):
            for rep in run_ranks(rank_stage_job, args.stage_ranks, run_dir, zero, stages)[0]:
                rows.append(
                    [
                        f"ZeRO-{zero}",
                        f"{STAGE_NAMES[2] if how == 'fresh' else STAGE_NAMES[rep['stage']]} ({how})",
                        f"{rep['trainable']:,}",
                        f"{rep['optim'] / MB:.2f}",
                        f"{rep['trainable'] * 8 / args.stage_ranks / MB:.2f}",
                        f"{rep['master'] / MB:.2f}",
                        f"{rep['accounted'] / MB:.0f}",
                        f"{rep['live'] / MB:.0f}",
                        f"{(rep['live'] - rep['accounted']) / MB:+.0f}",
                        f"{rep['rss_mb']:.0f}",
                    ]
                )
        print(f"  done: stage switches under ZeRO-{zero}", flush=True)
    print()
    print(f"Staged unfreezing at {args.stage_ranks} ranks, per rank (rank 0), after each stage's first step")
    header = ["ZeRO", "stage", "trainable", "optim MiB", "8 B x trainable / N", "master MiB", "accounted MiB",
              "live MiB", "live - accounted", "RSS +MiB"]  # fmt: skip
    print(table(header, rows))
    print(
        "(accounted = params + grads + master + optim + buffers as in the table above; live = every tensor storage "
        "the rank's Python objects reach, after gc)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16", help="train.bf16 on or off (default: bf16)")
    p.add_argument("--zero", type=int, nargs="+", default=[0, 1, 2, 3], help="ZeRO stages (default: 0 1 2 3)")
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default: 1 2 4)")
    p.add_argument("--stage-ranks", type=int, default=2, help="ranks for the stage-switch table (default: 2)")
    p.add_argument("--hidden", type=int, default=768, help="LM hidden size (default: %(default)s)")
    p.add_argument("--layers", type=int, default=8, help="LM decoder layers (default: %(default)s)")
    p.add_argument(
        "--tables", nargs="+", choices=["zero", "stages"], default=["zero", "stages"], help="(default: both)"
    )
    p.add_argument("--explain", action="store_true", help="print where each category's bytes live")
    args = p.parse_args()
    print("command:", command_line())
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp_name:
        tmp = Path(tmp_name)
        synth(tmp / "data", episodes=16, vl_samples=0, image_size=32, episodes_per_shard=4, progress=False)
        overrides = [
            f"run.output_dir={tmp / 'runs'}",
            f"data.sources=[{{path: {tmp / 'data' / 'robot'}, weight: 1.0}}]",
            "data.num_workers=0",
            f"model.backbone.pretrained={tmp / 'backbone'}",
            f"model.backbone.tiny.hidden_size={args.hidden}",
            f"model.backbone.tiny.num_layers={args.layers}",
            f"model.backbone.tiny.num_heads={args.hidden // 64}",
            f"model.backbone.tiny.intermediate_size={args.hidden * 8 // 3 // 64 * 64}",
            "model.backbone.tiny.vision_hidden_size=384",
            "model.backbone.tiny.vision_layers=4",
            "model.backbone.tiny.vision_heads=6",
            "model.backbone.tiny.image_size=32",
            "model.backbone.tiny.patch_size=8",
            "model.backbone.gradient_checkpointing=false",
            "train.micro_batch_size=1",
            "train.global_batch_size=1",
            f"train.bf16={'true' if args.dtype == 'bf16' else 'false'}",
            "wandb.mode=disabled",
        ]
        cfg = load_config(REPO / "configs" / "debug.yaml", overrides)
        ensure_tiny_backbone(cfg.model.backbone)
        run_dir = tmp / "runs" / "debug"
        run_dir.mkdir(parents=True)
        save_config(cfg, run_dir / "config.yaml")
        action_dim, state_dim = robot_dims(cfg)
        model = build_model(cfg.model, action_dim, state_dim, chunk_size=cfg.data.fwd_pred_next_n)
        params = sum(p.numel() for p in model.parameters())
        backbone = sum(p.numel() for p in model.adapter.parameters())
        del model
        print(
            f"RoboVLM (LLaVA: SigLIP 4 x 384 + Llama {args.layers} x {args.hidden}), {args.dtype}: "
            f"{params:,} parameters ({backbone:,} in the backbone); micro batch 1, one robot batch per step"
        )
        if "zero" in args.tables:
            zero_table(args, str(run_dir))
        if "stages" in args.tables:
            stage_table(args, str(run_dir))


if __name__ == "__main__":
    main()
