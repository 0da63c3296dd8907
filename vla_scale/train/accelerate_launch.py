"""`accelerate launch`, but a preempted run exits 75 (launchers/accelerate.sh runs this instead of accelerate's CLI).

Why: accelerate starts the ranks with torch.distributed.run, whose agent turns any failed rank into a
`ChildFailedError`; accelerate lets it escape, so the launcher always exits 1 and a scheduler wrapper
(launchers/slurm.sbatch) cannot tell a preemption save (`EXIT_PREEMPTED`, vla_scale/train/preempt.py) from a
crash. Here the same parser and `launch_command` run unchanged; only when the ranks stopped with 75 (the
others at most terminated by the agent afterwards: `preempt.preempted_exit_code`) does this process exit 75
too. Any other failure is re-raised as before (exit 1). launchers/torchrun.sh has the same wrapper
(vla_scale/train/torchrun_launch.py).
"""

from __future__ import annotations

import sys

from vla_scale.train.preempt import preempted_or_raise


def main(argv: list[str] | None = None) -> int:
    """Parse `accelerate launch` arguments and launch; 0 on success, 75 on a preemption."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        return preempted_or_raise(err, "accelerate_launch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
