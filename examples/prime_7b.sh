#!/usr/bin/env bash
# PRIME on Eurus-2-7B-SFT (Qwen2.5-Math-7B shape) with the paper's settings on one node of 8 GPUs,
# SGLang engines colocated with training (examples/configs/prime_7b.yaml).
#
#   bash examples/prime_7b.sh --dry-run [key=value ...]   # no SLURM: launch command, layout,
#                                                         # validated config, memory plan; exit 0
#                                                         # if it can run, non-zero and why if not
#   sbatch examples/prime_7b.sh [key=value ...]           # edit the variables below first
#   (run both from the repository root: the job works in the directory it was submitted from)
#
# Runs as a CHAIN OF REQUEUED JOBS. 592 steps at the paper's ~680 s per step take ~112 h, longer
# than most partitions allow. 600 s before the time limit Slurm sends USR1 to this script
# (--signal=B:USR1@600), which forwards it to every rank; the trainer finishes its current step,
# all ranks agree on that step, write a complete checkpoint and exit 0, and the script requeues
# the job (scontrol requeue, allowed by --requeue). The requeued job resumes from the latest
# checkpoint (checkpoint.resume=latest) with no flag. When training is done, the chain ends.
# SIGTERM (preemption, scancel) is forwarded the same way, without requeueing: a preempting
# partition with PreemptMode=REQUEUE requeues by itself.
#SBATCH --job-name=prime-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
# (Slurm does not create --output directories: the log goes to the submission directory, and
# the requeued jobs of the chain append to it.)
set -euo pipefail

# ---- paths and sizes -------------------------------------------------------------------------
CONFIG=${CONFIG:-examples/configs/prime_7b.yaml}
MODEL_DIR=${MODEL_DIR:-/path/to/Eurus-2-7B-SFT}            # HF checkpoint (megatron-prime sft output)
DATA_DIR=${DATA_DIR:-/path/to/Eurus-2-RL-Data}             # train.parquet, validation.parquet
OUT_DIR=${OUT_DIR:-outputs/prime_7b}                       # checkpoints, HF exports, logs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_MEM_GIB=${GPU_MEM_GIB:-80}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}                       # pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.04-py3; empty: host
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$PWD:$PWD,$(dirname "$MODEL_DIR"):$(dirname "$MODEL_DIR"),$DATA_DIR:$DATA_DIR}
NETWORK_IFNAME=${NETWORK_IFNAME:-}                         # e.g. ib0 or eth0: NCCL/gloo socket interface
PYTHON=${PYTHON:-python}
# ------------------------------------------------------------------------------------------------

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
NODES=${SLURM_JOB_NUM_NODES:-$(sed -n 's/^#SBATCH --nodes=\([0-9]*\).*/\1/p' "$0" | head -n1)}
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

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run of $0 (no SLURM needed): $NODES node(s) x $GPUS_PER_NODE GPUs = $WORLD_SIZE ranks"
    echo "launch: ${SRUN[*]} \\"
    echo "          ${TRAIN[*]}"
    echo "each rank r = SLURM_PROCID (0..$((WORLD_SIZE - 1))) on GPU SLURM_LOCALID of node r / $GPUS_PER_NODE;" \
         "rendezvous MASTER_ADDR=<first node of SLURM_JOB_NODELIST> MASTER_PORT=20000 + SLURM_JOB_ID % 20000"
    exec "$PYTHON" -m megatron_prime.cli plan "$CONFIG" --gpus "$WORLD_SIZE" --gpus-per-node "$GPUS_PER_NODE" \
        --gpu-mem "$GPU_MEM_GIB" --show-config "${OVERRIDES[@]}"
fi

# Rendezvous: every rank reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; these two it shares.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))
if [ -n "$NETWORK_IFNAME" ]; then export NCCL_SOCKET_IFNAME=$NETWORK_IFNAME GLOO_SOCKET_IFNAME=$NETWORK_IFNAME; fi
export CUDA_DEVICE_MAX_CONNECTIONS=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
mkdir -p "$OUT_DIR"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST: $WORLD_SIZE ranks, master $MASTER_ADDR:$MASTER_PORT"

# Run the ranks in the background so this shell can take USR1/TERM and forward them (srun
# passes signals it receives on to its tasks).
STOP=""
forward() { STOP=$1; echo "$(date): got SIG$1, asking every rank to stop at the next step boundary"; kill -"$1" "$SRUN_PID" 2>/dev/null || true; }
"${SRUN[@]}" "${TRAIN[@]}" &
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
