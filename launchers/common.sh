# Sourced by launchers/train.sh, torchrun.sh and accelerate.sh (not run on its own): the knobs they
# share, the per-rank environment, and the prepare step that must run once per job.
#
# After `vla_setup` these are set: ROOT PYTHON PER_NODE NUM_NODES NODE_RANK WORLD_SIZE
# MASTER_ADDR MASTER_PORT OMP_NUM_THREADS; after `vla_prepare CONFIG [overrides]`: RUN_DIR.

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

vla_die() {
    echo "[$(basename "$0")] error: $*" >&2
    exit 2
}

# Launchers started once per node (torchrun, accelerate) have no hostfile mode and need each node's rank.
vla_require_node_rank() { # $1: the launcher's name, for the message
    [[ -z "${HOSTFILE:-}" ]] || vla_die "HOSTFILE is for launchers/train.sh (ssh); with $1 set NODE_RANK on each node"
    if [[ "${NUM_NODES:-1}" -gt 1 && -z "${NODE_RANK:-}" ]]; then
        vla_die "set NODE_RANK (0 .. NUM_NODES-1) on every node: node 0 prepares the run, the others wait for it"
    fi
}

vla_is_dry_run() {
    [[ "${VLA_SCALE_DRY_RUN:-0}" == 1 ]]
}

vla_setup() {
    if [[ -z "${PYTHON:-}" ]]; then
        if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python; fi
    fi

    # Ranks per node: one per GPU, or CPU_RANKS processes on a machine without GPU. Counting GPUs imports
    # torch (over a second of CPU per launch); a machine without NVIDIA, ROCm or WSL GPU device files has none.
    local gpus_visible=0
    if compgen -G "/dev/nvidia[0-9]*" >/dev/null || [[ -e /dev/kfd || -e /dev/dxg ]]; then
        gpus_visible=$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())' 2>/dev/null || echo 0)
    fi
    if [[ "$gpus_visible" -gt 0 ]]; then
        PER_NODE=${GPUS_PER_NODE:-$gpus_visible}
    else
        PER_NODE=${CPU_RANKS:-2}
        export DS_ACCELERATOR=cpu
    fi

    if [[ -n "${HOSTFILE:-}" ]]; then
        [[ -f "$HOSTFILE" ]] || vla_die "HOSTFILE=$HOSTFILE does not exist"
        NUM_NODES=${NUM_NODES:-$(grep -cvE '^\s*(#|$)' "$HOSTFILE")}
    else
        NUM_NODES=${NUM_NODES:-1}
    fi
    WORLD_SIZE=$((NUM_NODES * PER_NODE))

    # NODE_RANK_GIVEN: this is one of NUM_NODES invocations, one per node (no ssh).
    NODE_RANK_GIVEN=${NODE_RANK:+1}
    NODE_RANK=${NODE_RANK:-0}
    [[ "$NODE_RANK" =~ ^[0-9]+$ && "$NODE_RANK" -lt "$NUM_NODES" ]] \
        || vla_die "NODE_RANK=$NODE_RANK must be a whole number below NUM_NODES=$NUM_NODES"

    # Without a cap every rank starts one OpenMP thread per core and they fight over the cores
    # (steps ~6x slower on CPU); split this node's cores between its ranks instead.
    if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
        OMP_NUM_THREADS=$(($(nproc) / PER_NODE))
        [[ "$OMP_NUM_THREADS" -ge 1 ]] || OMP_NUM_THREADS=1
    fi
    export OMP_NUM_THREADS

    # NCCL: when a peer dies, abort the collective and fail this rank instead of hanging until
    # the process-group timeout. The interface (NCCL_SOCKET_IFNAME, GLOO_SOCKET_IFNAME) is
    # cluster-specific and left to the user; see README "Launching on GPU clusters".
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}

    if [[ -z "${MASTER_ADDR:-}" ]]; then
        # One invocation per node: the others cannot guess where node 0 is.
        [[ "$NUM_NODES" -eq 1 || -z "$NODE_RANK_GIVEN" ]] \
            || vla_die "set MASTER_ADDR to node 0's address on every node (NUM_NODES=$NUM_NODES)"
        # With HOSTFILE and no MASTER_ADDR the deepspeed launcher asks the first host (ssh hostname -I).
        [[ -n "${HOSTFILE:-}" && "$NUM_NODES" -gt 1 ]] || MASTER_ADDR=127.0.0.1
    fi
    if [[ -z "${MASTER_PORT:-}" ]]; then
        if [[ "$NUM_NODES" -eq 1 ]]; then
            # A free port, so that several single-node jobs (parallel tests) never collide on 29500.
            MASTER_PORT=$("$PYTHON" -c 'import socket; s=socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
        else
            MASTER_PORT=29500
        fi
    fi
}

# Lay out the run directory once per job and set RUN_DIR.
#
# Node 0 runs `vla-scale prepare` (validates the config and data, writes config.yaml,
# ds_config.json and, for tiny test backbones, the random-weight checkpoint). Every other
# node only resolves the directory and waits until node 0's rendezvous port is open, which
# happens after node 0's prepare has finished (see `vla-scale run-dir`, vla_scale/train/run_dir.py); two nodes
# rewriting the same files on a shared filesystem could hand a rank a half-written config.
vla_prepare() {
    local resolve=("$PYTHON" -m vla_scale.cli run-dir "$@" --world-size "$WORLD_SIZE")
    if vla_is_dry_run; then
        RUN_DIR=$("${resolve[@]}")
        if [[ "$NODE_RANK" -eq 0 ]]; then
            vla_print_cmd "$PYTHON" -m vla_scale.cli prepare "$@" --world-size "$WORLD_SIZE"
        else
            vla_print_cmd "${resolve[@]}" --wait-for "$MASTER_ADDR:$MASTER_PORT"
        fi
    elif [[ "$NODE_RANK" -eq 0 ]]; then
        RUN_DIR=$("$PYTHON" -m vla_scale.cli prepare "$@" --world-size "$WORLD_SIZE")
    else
        echo "[$(basename "$0")] node $NODE_RANK: waiting for node 0 to prepare the run ($MASTER_ADDR:$MASTER_PORT)" >&2
        RUN_DIR=$("${resolve[@]}" --wait-for "$MASTER_ADDR:$MASTER_PORT" --timeout "${PREPARE_WAIT_S:-900}")
    fi
    echo "[$(basename "$0")] run directory: $RUN_DIR  (node $NODE_RANK of $NUM_NODES, ranks/node=$PER_NODE," \
        "world=$WORLD_SIZE, master=${MASTER_ADDR:-auto}:$MASTER_PORT, OMP_NUM_THREADS=$OMP_NUM_THREADS)"
}

vla_print_cmd() {
    printf '[dry-run] node %s:' "$NODE_RANK"
    printf ' %q' "$@"
    printf '\n'
}

# Replace this shell with the rank launcher, so signals (Ctrl-C, SLURM's SIGTERM) reach it
# directly; under VLA_SCALE_DRY_RUN=1 print the command instead.
# SIGUSR1 is ignored from here on (an ignored signal stays ignored across exec): a scheduler that
# signals every process of the job (slurm.sbatch's `--signal=USR1@...`) must not kill the launcher
# (the deepspeed launcher and torchrun do not handle USR1, so it would be fatal to them); the ranks
# install their own handler when `train.preempt_signal=SIGUSR1` (vla_scale/train/preempt.py).
vla_exec() {
    if vla_is_dry_run; then
        vla_print_cmd "$@"
        exit 0
    fi
    trap '' USR1
    exec "$@"
}
