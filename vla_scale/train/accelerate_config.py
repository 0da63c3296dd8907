"""The `accelerate launch` config of a run, generated next to its ds_config.json (launchers/accelerate.sh).

accelerate is only the launcher here: its DeepSpeed plugin section points at the run's `ds_config.json`,
so ZeRO stage, precision, gradient accumulation and clipping still come from the one YAML, and the ranks
(`python -m vla_scale.train.main`) build their DeepSpeed engine themselves, as under the other launchers.
What differs per node (machine count and rank, node 0's address and port) is passed on the
`accelerate launch` command line by the launcher, so one file serves every node.
"""

from __future__ import annotations

from pathlib import Path


def build_accelerate_config(ds_config_file: Path, world_size: int) -> dict:
    """accelerate's config (the schema `accelerate config` writes) for DeepSpeed with our ds_config.json."""
    return {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {
            # Absolute: nodes share the run directory at the same path, and accelerate may run elsewhere.
            "deepspeed_config_file": str(Path(ds_config_file).resolve()),
            # torch.distributed.run on every node (one invocation per node, like launchers/torchrun.sh), not
            # accelerate's default multi-node mode, which starts the other nodes over pdsh.
            "deepspeed_multinode_launcher": "standard",
            # The ranks do not create an accelerate.Accelerator, so nothing would honour a ZeRO-3 init flag.
            "zero3_init_flag": False,
        },
        # Precision is ds_config.json's (bf16/fp16 sections); accelerate refuses it in both places.
        "mixed_precision": "no",
        "num_processes": world_size,
        "num_machines": 1,  # the launcher passes the real count, this node's rank, address and port
        "machine_rank": 0,
        "rdzv_backend": "static",
        "same_network": True,  # a static rendezvous at MASTER_ADDR:MASTER_PORT with fixed node ranks
        "use_cpu": False,  # CPU runs still go through the DeepSpeed launch path (DS_ACCELERATOR=cpu, gloo)
    }
