#!/usr/bin/env bash
# Shared-base LoRA PRIME on a 70B-class dense base (Llama-3.1-70B shape) on ONE node of 8 GPUs:
# the policy and the implicit PRM are rank-32 LoRA adapters on one frozen copy of the base, which is
# also the reference (examples/configs/prime_70b_lora.yaml). TP=8, one SGLang engine (TP=8)
# colocated, fed the policy adapter alone after each update. Full-model PRIME at this size needs 5
# nodes (examples/prime_70b.sh). `bash examples/prime_70b_lora.sh --dry-run` prints the memory plan
# (~61 of 80 GiB per GPU at the rollout, the fullest phase).
#
#   bash examples/prime_70b_lora.sh --dry-run [key=value ...]  # no SLURM: launch command, layout,
#                                                              # validated config, memory plan
#   sbatch examples/prime_70b_lora.sh [key=value ...]          # edit the variables below first
#   (run both from the repository root: the job works in the directory it was submitted from)
#
# Runs as a CHAIN OF REQUEUED JOBS, as examples/prime_70b.sh does: USR1 600 s before the time limit,
# the trainer checkpoints at the step boundary and the script requeues the job, which resumes from
# the latest checkpoint (a LoRA checkpoint holds the adapters, their optimizers and a fingerprint of
# the base: resuming on another base is refused).
#SBATCH --job-name=prime-70b-lora
#SBATCH --nodes=1
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
CONFIG=${CONFIG:-examples/configs/prime_70b_lora.yaml}
MODEL_DIR=${MODEL_DIR:-/path/to/Llama-3.1-70B-SFT}        # HF checkpoint: the shared base
DATA_DIR=${DATA_DIR:-/path/to/Eurus-2-RL-Data}             # train.parquet, validation.parquet
OUT_DIR=${OUT_DIR:-outputs/prime_70b_lora}                  # checkpoints, HF exports, logs
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_MEM_GIB=${GPU_MEM_GIB:-80}
CONTAINER_IMAGE=${CONTAINER_IMAGE:-}                       # pyxis/enroot image, e.g. nvcr.io#nvidia/pytorch:25.04-py3; empty: host
CONTAINER_MOUNTS=${CONTAINER_MOUNTS:-$PWD:$PWD,$(dirname "$MODEL_DIR"):$(dirname "$MODEL_DIR"),$DATA_DIR:$DATA_DIR}
NETWORK_IFNAME=${NETWORK_IFNAME:-}                         # e.g. ib0 or eth0: NCCL/gloo socket interface
PYTHON=${PYTHON:-python}
# ------------------------------------------------------------------------------------------------

cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
source examples/slurm_job.sh
colocated_job "$@"
