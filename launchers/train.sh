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
#   MASTER_ADDR     address of node 0                            (default: 127.0.0.1)
#   MASTER_PORT     rendezvous port                              (default: a free port on single-node jobs, else 29500)
#   RANK_LOG_DIR    write each rank's output to files in this directory instead of the console
#   OMP_NUM_THREADS threads per rank                             (default: cores / ranks on this node)
#
# The config is validated and the run directory prepared before any process starts.
set -euo pipefail

if [[ $# -lt 1 ]]; then
    sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
CONFIG=$1
shift

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
fi

GPUS_VISIBLE=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
if [[ "$GPUS_VISIBLE" -gt 0 ]]; then
    PER_NODE=${GPUS_PER_NODE:-$GPUS_VISIBLE}
else
    PER_NODE=${CPU_RANKS:-2}
    export DS_ACCELERATOR=cpu
fi

if [[ -n "${HOSTFILE:-}" ]]; then
    NUM_NODES=${NUM_NODES:-$(grep -cvE '^\s*(#|$)' "$HOSTFILE")}
else
    NUM_NODES=${NUM_NODES:-1}
fi
WORLD_SIZE=$((NUM_NODES * PER_NODE))

if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
    CORES=$(nproc)
    OMP_NUM_THREADS=$((CORES / PER_NODE))
    [[ "$OMP_NUM_THREADS" -ge 1 ]] || OMP_NUM_THREADS=1
fi
export OMP_NUM_THREADS

MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z "${MASTER_PORT:-}" ]]; then
    if [[ "$NUM_NODES" -eq 1 ]]; then
        MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
    else
        MASTER_PORT=29500
    fi
fi

RUN_DIR=$("$PYTHON" -m vla_scale.cli prepare "$CONFIG" "$@" --world-size "$WORLD_SIZE")
echo "[train.sh] run directory: $RUN_DIR  (nodes=$NUM_NODES ranks/node=$PER_NODE OMP_NUM_THREADS=$OMP_NUM_THREADS)"

LAUNCH=(--num_nodes "$NUM_NODES" --num_gpus "$PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
    LAUNCH+=(--hostfile "$HOSTFILE")
elif [[ -n "${NODE_RANK:-}" ]]; then
    LAUNCH+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n "${RANK_LOG_DIR:-}" ]]; then
    mkdir -p "$RANK_LOG_DIR"
    LAUNCH+=(--enable_each_rank_log "$RANK_LOG_DIR")
fi

exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCH[@]}" --module vla_scale.train.main --run_dir "$RUN_DIR"
