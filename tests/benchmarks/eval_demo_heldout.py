"""How much of a trained demo policy generalises: loss_arm on training scenes vs freshly generated ones.

    .venv/bin/python tests/benchmarks/eval_demo_heldout.py runs/demo_cpu

For each data set it prints loss_arm with the true inputs, with the instructions shuffled
across the batch and with the images shuffled across the batch. A policy that grounds the
instruction in the image loses accuracy under both shuffles on held-out scenes; one that
memorised its training episodes only does so on the training scenes.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from data_tools.synth import synth
from vla_scale.data import StreamSpec, build_dataloader
from vla_scale.data.format import Manifest
from vla_scale.train.export import build_run_model


def evaluate(model, cfg, robot_path: str, batches: int, batch_size: int) -> dict[str, float]:
    data = dataclasses.replace(
        cfg.data,
        sources=[dataclasses.replace(cfg.data.sources[0], path=robot_path, weight=1.0)],
        augment=dataclasses.replace(cfg.data.augment, enabled=False),
        num_workers=1,
    )
    spec = StreamSpec(seed=123, rank=0, world_size=1, micro_batch_size=batch_size)
    loader = build_dataloader(data, spec, model.tokenizer)
    g = torch.Generator().manual_seed(0)
    out: dict[str, list[float]] = {"true": [], "shuffled instructions": [], "shuffled images": []}
    with torch.no_grad():
        for batch in itertools.islice(iter(loader), batches):
            perm = torch.randperm(batch.batch_size, generator=g)
            out["true"].append(model(batch)["loss_arm"].item())
            text = dataclasses.replace(batch, text_ids=batch.text_ids[perm], text_mask=batch.text_mask[perm])
            out["shuffled instructions"].append(model(text)["loss_arm"].item())
            out["shuffled images"].append(
                model(dataclasses.replace(batch, images=batch.images[perm]))["loss_arm"].item()
            )
    return {k: float(np.mean(v)) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--episodes", type=int, default=80, help="held-out episodes to generate")
    parser.add_argument("--seed", type=int, default=7, help="synth seed of the held-out scenes")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    model, cfg = build_run_model(args.run_dir)
    model.eval()
    train_robot = next(s.path for s in cfg.data.sources if Manifest.load(s.path).kind == "robot")
    size = Manifest.load(train_robot).image_size[0]
    with tempfile.TemporaryDirectory() as tmp:
        synth(tmp, episodes=args.episodes, vl_samples=1, image_size=size, seed=args.seed, progress=False)
        # Same normalisation as training: the model predicts in the training set's units.
        shutil.copy(Path(train_robot) / "stats.json", Path(tmp) / "robot" / "stats.json")
        for name, path in (("training scenes", train_robot), ("held-out scenes", str(Path(tmp) / "robot"))):
            res = evaluate(model, cfg, path, args.batches, args.batch_size)
            print(f"{name:16s} " + " | ".join(f"loss_arm {k}: {v:.4f}" for k, v in res.items()))
    print(f"command: .venv/bin/python tests/benchmarks/eval_demo_heldout.py {args.run_dir}")


if __name__ == "__main__":
    main()
