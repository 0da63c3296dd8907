"""Per-rank entry point started by `deepspeed` (`launchers/train.sh`), torchrun (`launchers/torchrun.sh`) or
`accelerate launch` (`launchers/accelerate.sh`, which runs torchrun's launcher underneath).

The launchers describe the process group in the environment (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), which is what `init_distributed` reads; only deepspeed also passes
`--local_rank`.
"""

from __future__ import annotations

import argparse
import os

from vla_scale.train.loop import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="one training rank of a prepared vla_scale run")
    parser.add_argument("--run_dir", required=True, help="run directory written by `vla-scale prepare`")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the deepspeed launcher")
    args = parser.parse_args(argv)
    # Tokenizers run in forked DataLoader workers; their own thread pool would deadlock there.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train(args.run_dir)


if __name__ == "__main__":
    main()
