"""Print a run's directory without writing anything; on nodes > 0, first wait for node 0 to prepare it.

    python launchers/run_dir.py CONFIG [section.key=value ...] --world-size N [--wait-for HOST:PORT]

Why: in a multi-node job started once per node (NODE_RANK, SLURM, torchrun) the run directory
lives on a shared filesystem, and `vla-scale prepare` rewrites `config.yaml` and
`ds_config.json` in it. If every node prepared, one node could rewrite those files while a
rank of another node reads them. So only node 0 prepares; the other nodes run this script.

With --wait-for it blocks until node 0's rendezvous port accepts a connection. Node 0 opens
that port only after its prepare step has finished (its ranks, or torchrun's agent, start
after prepare), so from then on the run directory is complete and nobody writes it again.
No marker file is needed, so nothing stale from an earlier launch of the same run can
release a node too early. It then checks that node 0 prepared the run this node was asked to
start (same resolved config, same world size) and prints the run directory.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path

from vla_scale.config import ConfigError, load_config, to_dict, validate
from vla_scale.train.ds_config import build_ds_config


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


def check_prepared(run_dir: Path, expected: dict, expected_ds: dict) -> None:
    """The prepared run must be the one this node was asked to start."""
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise ConfigError(
            f"{config_file} does not exist on this node although node 0 has started: the run directory "
            "(run.output_dir) must be on a filesystem every node shares, at the same path"
        )
    saved = _flatten(to_dict(load_config(config_file)))
    wanted = _flatten(expected)
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        details = ", ".join(f"{k}: node 0 has {saved.get(k)!r}, this node {wanted.get(k)!r}" for k in changed)
        raise ConfigError(f"node 0 prepared {run_dir} with another config ({details}); start every node alike")
    saved_ds = json.loads((run_dir / "ds_config.json").read_text())
    if saved_ds != expected_ds:
        raise ConfigError(
            f"{run_dir}/ds_config.json was prepared for another world size; give every node the same "
            "NUM_NODES and ranks per node"
        )


def _flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--world-size", type=int, required=True)
    parser.add_argument("--wait-for", default=None, metavar="HOST:PORT", help="node 0's rendezvous address")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for node 0")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        validate(cfg, args.world_size)
        run_dir = Path(cfg.run.output_dir) / cfg.run.name
        if args.wait_for:
            host, _, port = args.wait_for.rpartition(":")
            wait_for_port(host, int(port), args.timeout)
            check_prepared(run_dir, to_dict(cfg), build_ds_config(cfg, args.world_size))
    except (ConfigError, TimeoutError) as err:
        print(f"config error: {err}" if isinstance(err, ConfigError) else f"error: {err}", file=sys.stderr)
        return 2
    print(run_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
