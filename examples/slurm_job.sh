# Shared by the sbatch scripts in this folder (sourced, after each script's variables block and its
# `cd` to the submission directory; $0 stays the calling script, whose #SBATCH header is read).

# run_forwarding_signals COMMAND...: run the training ranks (an srun command) in the background so
# that this shell can take USR1/TERM and forward them (srun passes signals it receives on to its
# tasks); after a clean stop on USR1 (the time limit is near) requeue the job. Exits with the
# ranks' status.
run_forwarding_signals() {
    STOP=""
    forward() { STOP=$1; echo "$(date): got SIG$1, asking every rank to stop at the next step boundary"; kill -"$1" "$SRUN_PID" 2>/dev/null || true; }
    "$@" &
    SRUN_PID=$!
    trap 'forward USR1' USR1
    trap 'forward TERM' TERM
    while true; do
        set +e; wait "$SRUN_PID"; rc=$?; set -e
        kill -0 "$SRUN_PID" 2>/dev/null || break  # wait returned because a signal arrived: keep waiting
    done
    if [ "$rc" = 0 ] && [ "$STOP" = USR1 ]; then
        echo "$(date): stopped cleanly before the time limit with a checkpoint; requeueing $SLURM_JOB_ID"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    exit "$rc"
}

# allocation_nodes: the job's node count (SLURM's, or the script's #SBATCH header outside SLURM).
allocation_nodes() {
    echo "${SLURM_JOB_NUM_NODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$0" | head -n1)}"
}

# plan_and_exit: end a dry run with the memory plan and validated config of CONFIG + OVERRIDES on
# WORLD_SIZE training GPUs.
plan_and_exit() {
    exec "$PYTHON" -m megatron_prime.cli plan "$CONFIG" --gpus "$WORLD_SIZE" --gpus-per-node "$GPUS_PER_NODE" \
        --gpu-mem "$GPU_MEM_GIB" --show-config "${OVERRIDES[@]}"
}

# export_rendezvous: what every training rank shares besides its SLURM_PROCID / SLURM_NTASKS /
# SLURM_LOCALID: MASTER_ADDR (set by the caller), the port, the NIC and the NCCL settings.
export_rendezvous() {
    export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
    if [ -n "$NETWORK_IFNAME" ]; then export NCCL_SOCKET_IFNAME=$NETWORK_IFNAME GLOO_SOCKET_IFNAME=$NETWORK_IFNAME; fi
    export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
}

# colocated_job [--dry-run] [key=value ...]: training and colocated rollout engines on every node of
# the allocation, from CONFIG, MODEL_DIR, DATA_DIR, OUT_DIR, GPUS_PER_NODE, GPU_MEM_GIB,
# CONTAINER_IMAGE, CONTAINER_MOUNTS, NETWORK_IFNAME and PYTHON.
colocated_job() {
    local dry_run=0
    if [ "${1:-}" = "--dry-run" ]; then dry_run=1; shift; fi
    NODES=$(allocation_nodes)
    WORLD_SIZE=$((NODES * GPUS_PER_NODE))
    OVERRIDES=(
        "model.hf_path=$MODEL_DIR"
        "data.train_files=[$DATA_DIR/train.parquet]"
        "data.eval_files=[$DATA_DIR/validation.parquet]"
        "checkpoint.dir=$OUT_DIR/checkpoints" "checkpoint.export_dir=$OUT_DIR/hf" "logging.dir=$OUT_DIR/logs"
        "$@"
    )
    TRAIN=("$PYTHON" -m megatron_prime.cli train "$CONFIG" "${OVERRIDES[@]}")
    SRUN=(srun --kill-on-bad-exit=1 --nodes="$NODES" --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="${SLURM_CPUS_PER_TASK:-16}")
    if [ -n "$CONTAINER_IMAGE" ]; then
        SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS" --container-workdir="$PWD")
    fi

    if [ "$dry_run" = 1 ]; then
        echo "dry run of $0 (no SLURM needed): $NODES node(s) x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks"
        echo "launch: ${SRUN[*]} \\"
        echo "          ${TRAIN[*]}"
        echo "each rank r = SLURM_PROCID (0..$((WORLD_SIZE - 1))) on GPU SLURM_LOCALID of node r / $GPUS_PER_NODE;" \
             "rendezvous MASTER_ADDR=<first node of SLURM_JOB_NODELIST> MASTER_PORT=20000 + SLURM_JOB_ID % 20000"
        plan_and_exit
    fi

    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
    export_rendezvous
    mkdir -p "$OUT_DIR"
    echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $WORLD_SIZE ranks, master $MASTER_ADDR:$MASTER_PORT"
    run_forwarding_signals "${SRUN[@]}" "${TRAIN[@]}"
}
