"""DataLoader workers do not keep the rank's preemption handler: SIGTERM (torch's `terminate()`) kills them."""

import os
import signal

from torch.utils.data import DataLoader, IterableDataset

from tests.data.test_elastic import data_cfg
from vla_scale.data.loader import StreamSpec, build_dataloader, reset_worker_signals


class _Dispositions(IterableDataset):
    """Yields the worker's pid and its SIGTERM and SIGUSR1 dispositions (as text: a handler need not pickle)."""

    def __iter__(self):
        yield os.getpid(), repr(signal.getsignal(signal.SIGTERM)), repr(signal.getsignal(signal.SIGUSR1))


def test_forked_workers_have_the_default_sigterm_and_ignore_sigusr1(tmp_path, tokenizer):
    spec = StreamSpec(seed=0, rank=0, world_size=1, micro_batch_size=3)
    real = build_dataloader(data_cfg(tmp_path, elastic=False, workers=1), spec, tokenizer)
    assert real.worker_init_fn is reset_worker_signals and len(next(iter(real)).meta["keys"]) == 3

    def handler(signum, frame):  # stands in for the rank's Preemption handler, which a fork inherits
        pass

    old = signal.signal(signal.SIGTERM, handler), signal.signal(signal.SIGUSR1, handler)
    try:
        loader = DataLoader(_Dispositions(), batch_size=None, num_workers=1, worker_init_fn=reset_worker_signals)
        [(pid, term, usr1)] = list(loader)
        bare = DataLoader(_Dispositions(), batch_size=None, num_workers=1)
        [(_, term_bare, _)] = list(bare)
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGUSR1, old[1])
    assert pid != os.getpid() and term == repr(signal.SIG_DFL) and usr1 == repr(signal.SIG_IGN)
    assert term_bare == repr(handler)  # without it the worker keeps the inherited handler (the defect)
