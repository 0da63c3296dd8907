"""Rank script of tests/train/test_heads_zero.py: every prepared run trained in one process per rank.

    python -m tests.train.heads_rank --plan PLAN.json            (one per rank, started by jobs.run_module_ranks)
    python -m tests.train.heads_rank --check-exports PLAN.json   (one fresh process, after the ranks)

Why one process: a 2-rank job per (head, family) pair would pay the interpreter, DeepSpeed and process-group
start-up a dozen times. Here each rank sets up every run directory in turn with the training code itself
(`vla_scale.train.state.setup`, `Trainer.train_step` / `log`, the staged engine's switches, `RunState.save`), so
the model, ZeRO engine, stages, data and checkpoints are the ones `vla-scale train` uses.

Per run and step it records on rank 0: the logged loss, the stage, the parameters the step changed (those gathered
whole under ZeRO-3) and whether every rank holds identical parameters afterwards (a digest per parameter, all-
gathered). Runs marked `export` are checkpointed; their trained model, wrapped in a `Policy` in the rank, predicts
two steps of the plan's episode (the reference), and the export is written with `export_policy` by one rank.
`--check-exports` then loads each export with `Policy.from_pretrained` in a process that never trained and
compares its predictions with the references.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

PREDICT_SEED = 3  # flow: the sampled chunk is a function of this seed; the other action spaces ignore it


def _digests(model: torch.nn.Module) -> dict[str, str]:
    """sha1 of every parameter's full value (gathered under ZeRO-3: a collective, every rank calls it)."""
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        return {
            name: hashlib.sha1(p.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()
            for name, p in params.items()
        }


def _episode_inputs(plan: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Two frames and states of one episode and its instruction, saved by the test (`inputs`: .npz)."""
    with np.load(plan["inputs"]) as saved:
        return saved["frames"], saved["states"], str(saved["instruction"])


def predict_two_steps(policy, plan: dict) -> np.ndarray:
    """Two consecutive steps of one episode (history heads use their memory on the second), seeded."""
    frames, states, instruction = _episode_inputs(plan)
    policy.reset()
    steps = zip(frames, states, strict=True)
    return np.stack([policy.predict({"rgb_static": f}, instruction, s, seed=PREDICT_SEED) for f, s in steps])


def _reference_policy(run, plan: dict) -> np.ndarray:
    """The trained in-memory model behind a Policy built the way an export describes it."""
    from vla_scale.data.format import load_stats
    from vla_scale.data.normalize import Normalizer
    from vla_scale.policy import Policy
    from vla_scale.train import checkpoint
    from vla_scale.train.export import policy_spec, robot_manifest

    data_dir, manifest = robot_manifest(run.cfg)
    spec = policy_spec(run.cfg, manifest, checkpoint.read_latest(run.ckpt_dir))
    model = run.staged.engine.module
    policy = Policy(model, Normalizer(load_stats(data_dir), manifest.robot_spaces), spec, device="cpu")
    return predict_two_steps(policy, plan)


def train_one(run_dir: Path, plan: dict, entry: dict) -> dict:
    """Train `run_dir` for its configured steps, checking each step; returns rank 0's record."""
    from vla_scale.train.loop import Trainer
    from vla_scale.train.state import setup

    run = setup(run_dir)
    trainer = Trainer(run)
    model = run.staged.engine.module
    rank, steps = run.rank, []
    while run.step < run.cfg.train.max_steps:
        run.staged.switch_if_due(run.step)
        before = _digests(model)
        trainer.train_step()
        values = trainer.log()
        after = _digests(model)
        every_rank = [None] * run.world
        dist.all_gather_object(every_rank, after)
        changed = sorted(n for n in after if after[n] != before[n])
        steps.append(
            {
                "step": run.step,
                "stage": run.staged.stage.index,
                "loss": values.get("loss"),
                "trainable": sorted(run.staged.stage.trainable),
                "changed": changed,
                "differ_across_ranks": sorted(n for n in after if any(d[n] != after[n] for d in every_rank)),
            }
        )
    record = {"name": run.cfg.run.name, "zero_stage": run.cfg.train.zero_stage, "steps": steps}
    if entry.get("export"):
        run.save()
        if rank == 0:
            record["reference"] = _reference_policy(run, plan).tolist()
    trainer.writer.close()
    run.staged.engine.destroy()
    return record


def train_all(plan_path: Path) -> None:
    """Every run of the plan in order; rank i % world exports run i's checkpoint right after it (before any ZeRO-3
    run: while a ZeRO-3 run's state is alive, transformers builds every model under `deepspeed.zero.Init`)."""
    from vla_scale.train.export import export_policy

    plan = json.loads(plan_path.read_text())
    records = []
    for i, entry in enumerate(plan["runs"]):
        start = time.perf_counter()
        records.append(train_one(Path(entry["run_dir"]), plan, entry))
        gc.collect()  # the run's engine and, under ZeRO-3, its HfDeepSpeedConfig
        if entry.get("export") and i % dist.get_world_size() == dist.get_rank():
            export_policy(entry["run_dir"], entry["export"])
        records[-1]["wall_s"] = round(time.perf_counter() - start, 2)
        print(f"[heads_rank] {records[-1]['name']}: {records[-1]['wall_s']} s", flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        Path(plan["results"]).write_text(json.dumps(records))
    dist.destroy_process_group()


def check_exports(plan_path: Path) -> int:
    """In a fresh process: each export's Policy predicts what the trained model predicted; 0 when all agree."""
    from vla_scale.policy import Policy

    plan = json.loads(plan_path.read_text())
    records = json.loads(Path(plan["results"]).read_text())
    references = {r["name"]: np.array(r["reference"]) for r in records if "reference" in r}
    report = {}
    for entry in plan["runs"]:
        if not entry.get("export"):
            continue
        policy = Policy.from_pretrained(entry["export"], device="cpu")
        actions = predict_two_steps(policy, plan)
        expected = references[Path(entry["run_dir"]).name]
        report[entry["export"]] = {
            "action_space": policy.model.cfg.action_space,
            "head": policy.model.cfg.head.type,
            "shape": list(actions.shape),
            "max_abs_diff": float(np.abs(actions - expected).max()) if actions.shape == expected.shape else None,
            "finite": bool(np.isfinite(actions).all()),
        }
    print(json.dumps(report))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plan", type=Path)
    parser.add_argument("--check-exports", type=Path)
    args = parser.parse_args()
    if args.check_exports is not None:
        return check_exports(args.check_exports)
    train_all(args.plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
