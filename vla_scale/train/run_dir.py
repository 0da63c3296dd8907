"""Resolve a run's directory without writing anything; on nodes > 0, first wait for node 0 to prepare it.

    vla-scale run-dir CONFIG [section.key=value ...] --world-size N [--wait-for HOST:PORT]

Why: in a multi-node job started once per node (NODE_RANK, SLURM, torchrun) the run directory
lives on a shared filesystem, and `vla-scale prepare` rewrites `config.yaml` and
`ds_config.json` in it. If every node prepared, one node could rewrite those files while a
rank of another node reads them. So only node 0 prepares; the other nodes run this command.

With --wait-for it blocks until node 0's rendezvous port accepts a connection. Node 0 opens
that port only after its prepare step has finished (its ranks, or torchrun's agent, start
after prepare), so from then on the run directory is complete and nobody writes it again.
No marker file is needed, so nothing stale from an earlier launch of the same run can
release a node too early. It then asks `check_same_run` whether node 0 prepared the run this
node was asked to start (same resolved config, same world size).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path

from vla_scale.config import ConfigError, load_config, validate
from vla_scale.train.resume_check import check_same_run


def wait_for_port(host: str, port: int, timeout_s: float) -> None:
    """Block until `host:port` accepts a TCP connection; raise TimeoutError after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"node 0 did not open {host}:{port} within {timeout_s:.0f}s; is it running with the same "
                    "MASTER_ADDR/MASTER_PORT, and did its prepare step succeed? (see its output)"
                ) from None
            time.sleep(1.0)


def resolve_run_dir(
    config: str | Path, overrides: Sequence[str], world_size: int, wait_for: str | None = None, timeout_s: float = 900.0
) -> Path:
    """The run directory of (config, overrides); with `wait_for` ("HOST:PORT"), once node 0 has prepared it.

    Raises ConfigError when the config is invalid or node 0 prepared a different run, TimeoutError when
    node 0 never opens its port.
    """
    cfg = load_config(config, overrides)
    validate(cfg, world_size)
    run_dir = Path(cfg.run.output_dir) / cfg.run.name
    if wait_for:
        host, _, port = wait_for.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--wait-for {wait_for!r}: expected HOST:PORT")
        wait_for_port(host, int(port), timeout_s)
        check_same_run(run_dir, cfg, world_size, exact=True, prepared=True)
    return run_dir
