"""vla_scale/train/accelerate_launch.py's rule for passing a preemption through `accelerate launch`.

The launch itself (two nodes, preempted, exit 75 from each launcher, resumed) is in tests/train/test_multinode.py.
"""

from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from vla_scale.train.accelerate_launch import exit_code_of
from vla_scale.train.preempt import EXIT_PREEMPTED


def failures(*codes: int) -> dict[int, ProcessFailure]:
    return {rank: ProcessFailure(rank, 1000 + rank, code, "<N/A>") for rank, code in enumerate(codes)}


def test_preemption_passes_through_even_when_the_agent_terminated_the_other_ranks():
    assert exit_code_of(failures(EXIT_PREEMPTED, EXIT_PREEMPTED)) == EXIT_PREEMPTED
    assert exit_code_of(failures(EXIT_PREEMPTED)) == EXIT_PREEMPTED
    assert exit_code_of(failures(-15, EXIT_PREEMPTED, -9)) == EXIT_PREEMPTED  # SIGTERM, then SIGKILL after grace


def test_any_real_failure_is_not_a_preemption():
    assert exit_code_of(failures(1)) is None
    assert exit_code_of(failures(EXIT_PREEMPTED, 1)) is None  # a crash beside a preemption is still a crash
    assert exit_code_of(failures(-9)) is None  # killed (OOM), nothing preempted
    assert exit_code_of({}) is None
