#!/usr/bin/env bash
# PRIME on a 70B-class base with rollout apart from training, in one allocation split by node:
# the first TRAIN_NODES nodes train (TP=8, PP=4, DP=2: examples/configs/prime_70b.yaml), the
# other ROLLOUT_NODES each run one SGLang server (TP=8) behind one sglang-router. After every
# update global rank 0 broadcasts the new weights to the servers over NCCL
# (rollout.mode=remote); the training GPUs keep no engine, the servers keep their KV cache.
#
#   bash examples/prime_70b_disagg.sh --dry-run [key=value ...]   # no SLURM: commands, layout, plan
#   sbatch examples/prime_70b_disagg.sh [key=value ...]
#   (run both from the repository root: the job works in the directory it was submitted from)
#
# Runs as a CHAIN OF REQUEUED JOBS, like examples/prime_7b.sh: USR1 600 s before the time limit
# is forwarded to the training ranks, which finish their step, checkpoint and exit 0; the job is
# then requeued and resumes from that checkpoint (the servers start afresh and get the resumed
# policy's weights at start-up).
#SBATCH --job-name=prime-70b-disagg
#SBATCH --nodes=12
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail

# ---- paths and sizes -------------------------------------------------------------------------
CONFIG=${CONFIG:-examples/configs/prime_70b.yaml}
MODEL_DIR=${MODEL_DIR:-/path/to/Llama-3.1-70B-SFT}
DATA_DIR=${DATA_DIR:-/path/to/Eurus-2-RL-Data}
OUT_DIR=${OUT_DIR:-outputs/prime_70b_disagg}
TRAIN_NODES=${TRAIN_NODES:-8}                              # the rest of the allocation serves rollouts
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_MEM_GIB=${GPU_MEM_GIB:-80}
SERVER_PORT=${SERVER_PORT:-30000}
ROUTER_PORT=${ROUTER_PORT:-31000}
WEIGHT_SYNC_PORT=${WEIGHT_SYNC_PORT:-29650}
SERVER_MEM_FRACTION=${SERVER_MEM_FRACTION:-0.85}           # servers have their GPUs to themselves
SERVER_START_TIMEOUT=${SERVER_START_TIMEOUT:-1800}         # seconds to load 70B weights and warm up
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$PWD:$PWD,$(dirname "$MODEL_DIR"):$(dirname "$MODEL_DIR"),$DATA_DIR:$DATA_DIR}
NETWORK_IFNAME=${NETWORK_IFNAME:-}
PYTHON=${PYTHON:-python}
# ------------------------------------------------------------------------------------------------

DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source examples/slurm_job.sh
NODES=$(allocation_nodes)
ROLLOUT_NODES=$((NODES - TRAIN_NODES))
if [ "$ROLLOUT_NODES" -lt 1 ]; then
    echo "error: $NODES nodes leave none for rollout servers (TRAIN_NODES=$TRAIN_NODES)" >&2; exit 2
fi
if [ "$DRY_RUN" = 1 ]; then
    HOSTS=(); for i in $(seq 0 $((NODES - 1))); do HOSTS+=("node$i"); done  # placeholders
else
    mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
fi
TRAIN_HOSTS=("${HOSTS[@]:0:TRAIN_NODES}")
ROLLOUT_HOSTS=("${HOSTS[@]:TRAIN_NODES}")
WORLD_SIZE=$((TRAIN_NODES * GPUS_PER_NODE))
MASTER_ADDR=${TRAIN_HOSTS[0]}
URLS=(); for h in "${ROLLOUT_HOSTS[@]}"; do URLS+=("http://$h:$SERVER_PORT"); done
ROUTER_URL=http://${ROLLOUT_HOSTS[0]}:$ROUTER_PORT
OVERRIDES=(
    "model.hf_path=$MODEL_DIR"
    "data.train_files=[$DATA_DIR/train.parquet]"
    "data.eval_files=[$DATA_DIR/validation.parquet]"
    "checkpoint.dir=$OUT_DIR/checkpoints" "checkpoint.export_dir=$OUT_DIR/hf" "logging.dir=$OUT_DIR/logs"
    "rollout.mode=remote" "rollout.tp=$GPUS_PER_NODE" "rollout.remote_urls=[$(IFS=,; echo "${URLS[*]}")]"
    "rollout.router_url=$ROUTER_URL" "rollout.weight_sync_address=$MASTER_ADDR"
    "rollout.weight_sync_port=$WEIGHT_SYNC_PORT"
    "$@"
)
SRUN=(srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-16}")
if [ -n "$CONTAINER_IMAGE" ]; then
    SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$CONTAINER_MOUNTS" --container-workdir="$PWD")
fi
SERVER=("$PYTHON" -m sglang.launch_server --model-path "$MODEL_DIR" --tp "$GPUS_PER_NODE" --host 0.0.0.0
        --port "$SERVER_PORT" --mem-fraction-static "$SERVER_MEM_FRACTION")
ROUTER=("$PYTHON" -m sglang_router.launch_router --worker-urls "${URLS[@]}" --host 0.0.0.0 --port "$ROUTER_PORT"
        --policy cache_aware)
TRAIN_SRUN=("${SRUN[@]}" --nodes="$TRAIN_NODES" --ntasks-per-node="$GPUS_PER_NODE" --nodelist="$(IFS=,; echo "${TRAIN_HOSTS[*]}")")
TRAIN=("$PYTHON" -m megatron_prime.cli train "$CONFIG" "${OVERRIDES[@]}")

if [ "$DRY_RUN" = 1 ]; then
    echo "dry run of $0 (no SLURM needed): $NODES nodes = $TRAIN_NODES training ($WORLD_SIZE ranks) + $ROLLOUT_NODES rollout"
    echo "(host names node0..node$((NODES - 1)) stand for the allocation's nodes)"
    for h in "${ROLLOUT_HOSTS[@]}"; do
        echo "server on $h: ${SRUN[*]} --nodes=1 --ntasks=1 --gpus-per-node=$GPUS_PER_NODE --nodelist=$h ${SERVER[*]}"
    done
    echo "router on ${ROLLOUT_HOSTS[0]}: ${SRUN[*]} --nodes=1 --ntasks=1 --overlap --nodelist=${ROLLOUT_HOSTS[0]} ${ROUTER[*]}"
    echo "health wait: GET <server>/health for each server, then GET $ROUTER_URL/health (up to ${SERVER_START_TIMEOUT}s)"
    echo "training: ${TRAIN_SRUN[*]} \\"
    echo "          ${TRAIN[*]}"
    echo "each training rank r = SLURM_PROCID (0..$((WORLD_SIZE - 1))); rendezvous MASTER_ADDR=$MASTER_ADDR" \
         "MASTER_PORT=20000 + SLURM_JOB_ID % 20000; rank 0 broadcasts weights on $MASTER_ADDR:$WEIGHT_SYNC_PORT"
    plan_and_exit
fi

export_rendezvous
mkdir -p "$OUT_DIR/servers"
echo "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): training on ${TRAIN_HOSTS[*]}, servers on ${ROLLOUT_HOSTS[*]}"

# 1. One SGLang server per rollout node, then the router in front of them.
SERVICE_PIDS=()
for h in "${ROLLOUT_HOSTS[@]}"; do
    "${SRUN[@]}" --nodes=1 --ntasks=1 --gpus-per-node="$GPUS_PER_NODE" --nodelist="$h" "${SERVER[@]}" \
        > "$OUT_DIR/servers/$h.log" 2>&1 &
    SERVICE_PIDS+=($!)
done
"${SRUN[@]}" --nodes=1 --ntasks=1 --overlap --nodelist="${ROLLOUT_HOSTS[0]}" "${ROUTER[@]}" \
    > "$OUT_DIR/servers/router.log" 2>&1 &
SERVICE_PIDS+=($!)
cleanup() { for pid in "${SERVICE_PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done; }
trap cleanup EXIT

# 2. Health wait: every server answers /health, then the router does.
wait_healthy() {  # URL
    local deadline=$((SECONDS + SERVER_START_TIMEOUT))
    until curl -sf -o /dev/null "$1/health"; do
        if [ "$SECONDS" -ge "$deadline" ]; then echo "error: $1 not healthy after ${SERVER_START_TIMEOUT}s (see $OUT_DIR/servers/)" >&2; exit 1; fi
        for pid in "${SERVICE_PIDS[@]}"; do
            kill -0 "$pid" 2>/dev/null || { echo "error: a server or the router exited (see $OUT_DIR/servers/)" >&2; exit 1; }
        done
        sleep 10
    done
    echo "$(date): $1 is healthy"
}
for url in "${URLS[@]}"; do wait_healthy "$url"; done
wait_healthy "$ROUTER_URL"

# 3. Training, with USR1/TERM forwarded to its ranks, and the requeue chain.
run_forwarding_signals "${TRAIN_SRUN[@]}" "${TRAIN[@]}"
