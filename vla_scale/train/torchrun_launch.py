"""`torchrun`, but a preempted run exits 75 (launchers/torchrun.sh runs it instead of `-m torch.distributed.run`).

Why: torchrun's agent turns any failed rank into a `ChildFailedError` and exits 1, so a scheduler wrapper
(launchers/slurm.sbatch) could not tell a preemption save (`EXIT_PREEMPTED`, vla_scale/train/preempt.py) from a
crash. torchrun's own parser and `run` are used unchanged (under its `record`, which writes the error files as
torchrun does); only a failure that is a preemption (`preempt.preempted_exit_code`) becomes exit 75.
"""

from __future__ import annotations

import sys

from vla_scale.train.preempt import preempted_or_raise


def main(argv: list[str] | None = None) -> int:
    """Parse torchrun's arguments and launch; 0 on success, 75 on a preemption, torchrun's failure otherwise."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, record
    from torch.distributed.run import parse_args, run

    try:
        record(run)(parse_args(argv))
    except ChildFailedError as err:
        return preempted_or_raise(err, "torchrun_launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
