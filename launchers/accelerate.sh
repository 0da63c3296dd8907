#!/usr/bin/env bash
# Train a vla_scale run with `accelerate launch`, one invocation per node.
#
#   launchers/accelerate.sh CONFIG [section.key=value ...]
#
# accelerate is the launcher only: the prepare step writes RUN_DIR/accelerate_config.yaml, whose DeepSpeed
# plugin section points at the run's ds_config.json (ZeRO stage, precision, accumulation and clipping all come
# from the one YAML), and the ranks (`python -m vla_scale.train.main`) build their DeepSpeed engine themselves,
# in the same single place as under launchers/train.sh and launchers/torchrun.sh. accelerate starts them with
# torch.distributed.run on every node (deepspeed_multinode_launcher: standard), so the ranks see the same
# environment as under torchrun.sh (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
# `accelerate launch` runs through vla_scale/train/accelerate_launch.py (the same parser and launch code): a run
# whose ranks stop for preemption makes this script exit 75, as train.sh does, where accelerate's own CLI exits 1.
#
# Environment knobs (all optional):
#   PYTHON          python with vla_scale installed             (default: .venv/bin/python if present, else python)
#   NUM_NODES       nodes in the job                             (default: 1)
#   NODE_RANK       this node's rank, 0 .. NUM_NODES-1; node 0 prepares the run (default: 0)
#   GPUS_PER_NODE   ranks per node on GPU machines               (default: all visible GPUs)
#   CPU_RANKS       ranks per node when there is no GPU          (default: 2)
#   MASTER_ADDR     address of node 0                            (default: 127.0.0.1; required when NUM_NODES > 1)
#   MASTER_PORT     rendezvous port on node 0                    (default: a free port on single-node jobs, else 29500)
#   PREPARE_WAIT_S  how long nodes > 0 wait for node 0 to prepare the run (default: 900)
#   RANK_LOG_DIR    also write each rank's stdout/stderr to files under this directory (accelerate has no files-only mode)
#   OMP_NUM_THREADS threads per rank                             (default: cores / ranks on this node)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING, NCCL_DEBUG   (defaults: 1, WARN); NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME: unset
#   VLA_SCALE_DRY_RUN=1  print the prepare and launch commands instead of running them
#
# The config is validated and the run directory prepared (on node 0 only) before any process starts.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" # the header above
    exit 2
fi
CONFIG=$1
shift

# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
vla_require_node_rank accelerate
vla_setup
vla_prepare "$CONFIG" "$@"

# The per-node values override the generic ones in the prepared file.
LAUNCH=(--config_file "$RUN_DIR/accelerate_config.yaml" --num_processes "$WORLD_SIZE" --num_machines "$NUM_NODES"
    --machine_rank "$NODE_RANK" --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT")
if [[ -n "${RANK_LOG_DIR:-}" ]]; then
    mkdir -p "$RANK_LOG_DIR"
    # torch.distributed.run's options, which accelerate passes through
    LAUNCH+=(--log_dir "$RANK_LOG_DIR" --tee 3)
fi

vla_exec "$PYTHON" -m vla_scale.train.accelerate_launch "${LAUNCH[@]}" -m vla_scale.train.main --run_dir "$RUN_DIR"
