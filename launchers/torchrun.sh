#!/usr/bin/env bash
# Train a vla_scale run with torchrun (torch.distributed.run), one invocation per node.
#
#   launchers/torchrun.sh CONFIG [section.key=value ...]
#
# Environment knobs (all optional):
#   PYTHON          python with vla_scale installed             (default: .venv/bin/python if present, else python)
#   NUM_NODES       nodes in the job                             (default: 1)
#   NODE_RANK       this node's rank, 0 .. NUM_NODES-1; node 0 prepares the run (default: 0)
#   GPUS_PER_NODE   ranks per node on GPU machines               (default: all visible GPUs)
#   CPU_RANKS       ranks per node when there is no GPU          (default: 2)
#   MASTER_ADDR     address of node 0                            (default: 127.0.0.1; required when NUM_NODES > 1)
#   MASTER_PORT     rendezvous port on node 0                    (default: a free port on single-node jobs, else 29500)
#   RDZV_BACKEND    static (fixed NODE_RANK, default) or c10d (torchrun's dynamic rendezvous on MASTER_ADDR:MASTER_PORT)
#   RDZV_ID         job id shared by all nodes with RDZV_BACKEND=c10d (default: vla_scale)
#   MAX_RESTARTS    times torchrun restarts the ranks after a failure; each restart resumes from `latest` (default: 0)
#   PREPARE_WAIT_S  how long nodes > 0 wait for node 0 to prepare the run (default: 900)
#   RANK_LOG_DIR    write each rank's stdout/stderr to files under this directory instead of the console
#   OMP_NUM_THREADS threads per rank                             (default: cores / ranks on this node)
#   TORCH_NCCL_ASYNC_ERROR_HANDLING, NCCL_DEBUG   (defaults: 1, WARN); NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME: unset
#   VLA_SCALE_DRY_RUN=1  print the prepare and launch commands instead of running them
#
# The config is validated and the run directory prepared (on node 0 only) before any process starts.
# torchrun runs through vla_scale/train/torchrun_launch.py (its own parser and launch code): when the ranks stop for
# preemption (exit 75) this script exits 75 too, where torchrun's CLI exits 1. With MAX_RESTARTS > 0 torchrun
# restarts the ranks after a preemption like after any failure (they resume from the preemption's checkpoint).
set -euo pipefail

if [[ $# -lt 1 ]]; then
    awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0" # the header above
    exit 2
fi
CONFIG=$1
shift

# torchrun has no hostfile mode: start this script once on every node.
# shellcheck source=launchers/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
vla_require_node_rank torchrun
vla_setup
vla_prepare "$CONFIG" "$@"

LAUNCH=(--nnodes "$NUM_NODES" --nproc_per_node "$PER_NODE" --max_restarts "${MAX_RESTARTS:-0}")
case "${RDZV_BACKEND:-static}" in
    static) LAUNCH+=(--node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT") ;;
    # torchrun numbers the nodes itself; NODE_RANK then only says which node prepares the run
    # (node 0 must be the one at MASTER_ADDR, which hosts the rendezvous).
    c10d) LAUNCH+=(--rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv_id "${RDZV_ID:-vla_scale}") ;;
    *) vla_die "RDZV_BACKEND=$RDZV_BACKEND: use static or c10d" ;;
esac
if [[ -n "${RANK_LOG_DIR:-}" ]]; then
    mkdir -p "$RANK_LOG_DIR"
    LAUNCH+=(--log_dir "$RANK_LOG_DIR" --redirects 3)
fi

vla_exec "$PYTHON" -m vla_scale.train.torchrun_launch "${LAUNCH[@]}" -m vla_scale.train.main --run_dir "$RUN_DIR"
