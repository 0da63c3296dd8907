"""`accelerate launch`, but a preempted run exits 75 (launchers/accelerate.sh runs this instead of accelerate's CLI).

Why: accelerate starts the ranks with torch.distributed.run, whose agent turns any failed rank into a
`ChildFailedError`; accelerate lets it escape, so the launcher always exits 1 and a scheduler wrapper
(launchers/slurm.sbatch) cannot tell a preemption save (`EXIT_PREEMPTED`, vla_scale/train/preempt.py) from a
crash. Here the same parser and `launch_command` run unchanged; only when the ranks stopped with 75 (the
others at most terminated by the agent afterwards) does this process exit 75 too. Any other failure is
re-raised as before (exit 1).
"""

from __future__ import annotations

import sys

from vla_scale.train.preempt import EXIT_PREEMPTED


def exit_code_of(failures: dict) -> int | None:
    """`EXIT_PREEMPTED` when some rank exited with it and every other failed rank either did too or died of a
    signal, else None.

    The agent terminates the remaining ranks once one has exited (SIGTERM, SIGKILL after a grace period), so
    those show up with negative codes: consequences of the preemption, not causes. Any positive code other
    than 75 is a real failure. (torch's failure timestamps are whole seconds, too coarse to order them.)"""
    codes = [failure.exitcode for failure in failures.values()]
    if EXIT_PREEMPTED in codes and all(code == EXIT_PREEMPTED or code < 0 for code in codes):
        return EXIT_PREEMPTED
    return None


def main(argv: list[str] | None = None) -> int:
    """Parse `accelerate launch` arguments and launch; 0 on success, 75 on a preemption."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except ChildFailedError as err:
        code = exit_code_of(err.failures)
        if code is None:
            raise
        ranks = ", ".join(f"rank {rank}: {f.exitcode}" for rank, f in sorted(err.failures.items()))
        print(f"[accelerate_launch] ranks stopped for preemption ({ranks}); exiting {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
