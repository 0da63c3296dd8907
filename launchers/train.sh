#!/usr/bin/env bash
# Train a vla_scale run with the DeepSpeed launcher.
#
#   launchers/train.sh CONFIG [section.key=value ...]
#
# Environment knobs (all optional):
#   PYTHON          python with vla_scale installed             (default: .venv/bin/python if present, else python)
#   NUM_NODES       nodes in the job                             (default: 1, or the hosts in HOSTFILE)
#   GPUS_PER_NODE   ranks per node on GPU machines               (default: all visible GPUs)
#   CPU_RANKS       ranks per node when there is no GPU          (default: 2)
#   HOSTFILE        DeepSpeed hostfile ("host slots=N" lines); the launcher reaches hosts with ssh/pdsh
#   NODE_RANK       this node's rank, for one invocation per node without ssh (with MASTER_ADDR)
#   MASTER_ADDR     address of node 0                            (default: 127.0.0.1; required with NODE_RANK)
#   MASTER_PORT     rendezvous port                              (default: a free port on single-node jobs, else 29500)
#   PREPARE_WAIT_S  how long nodes > 0 wait for node 0 to prepare the run (default: 900)
#   RANK_LOG_DIR    write each rank's output to files in this directory instead of the console
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
vla_setup
vla_prepare "$CONFIG" "$@"

LAUNCH=(--num_nodes "$NUM_NODES" --num_gpus "$PER_NODE" --master_port "$MASTER_PORT")
[[ -z "${MASTER_ADDR:-}" ]] || LAUNCH+=(--master_addr "$MASTER_ADDR")
if [[ -n "$NODE_RANK_GIVEN" ]]; then
    # One invocation per node: this one starts only its own ranks. The deepspeed launcher still
    # wants a hostfile to count the nodes and their slots; the host names in it are never used.
    if [[ -z "${HOSTFILE:-}" ]]; then
        HOSTFILE="$RUN_DIR/hostfile.node$NODE_RANK"
        vla_is_dry_run || for ((i = 0; i < NUM_NODES; i++)); do echo "node$i slots=$PER_NODE"; done >"$HOSTFILE"
    fi
    LAUNCH+=(--hostfile "$HOSTFILE" --no_ssh --node_rank "$NODE_RANK")
elif [[ -n "${HOSTFILE:-}" ]]; then
    # The launcher starts every node over ssh/pdsh and forwards only NCCL_*/PYTHON* variables
    # plus the lines of a .deepspeed_env file. Write one holding the per-rank settings computed
    # here, followed by the user's own ~/.deepspeed_env and ./.deepspeed_env (which still win).
    if ! vla_is_dry_run; then
        ENV_FILE="$(cd "$RUN_DIR" && pwd)/deepspeed_env"
        {
            for var in OMP_NUM_THREADS DS_ACCELERATOR TORCH_NCCL_ASYNC_ERROR_HANDLING GLOO_SOCKET_IFNAME WANDB_MODE; do
                [[ -z "${!var:-}" ]] || echo "$var=${!var}"
            done
            for user_file in ~/.deepspeed_env ./.deepspeed_env; do
                if [[ -f "$user_file" ]]; then sed -e '$a\' "$user_file"; fi # (adds a missing final newline)
            done
        } >"$ENV_FILE"
        export DS_ENV_FILE="$ENV_FILE" # an absolute path: deepspeed joins it to ~ and ., which keeps it as is
    fi
    LAUNCH+=(--hostfile "$HOSTFILE")
fi
if [[ -n "${RANK_LOG_DIR:-}" ]]; then
    mkdir -p "$RANK_LOG_DIR"
    LAUNCH+=(--enable_each_rank_log "$RANK_LOG_DIR")
fi

vla_exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" --module vla_scale.train.main --run_dir "$RUN_DIR"
