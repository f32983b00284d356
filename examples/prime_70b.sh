#!/usr/bin/env bash
# PRIME on a 70B-class dense base (Llama-3.1-70B shape) with the paper's settings on 8 nodes of 8
# GPUs: TP=8 inside each node, PP=4 across nodes, DP=2, one SGLang engine (TP=8) per node
# colocated with training (examples/configs/prime_70b.yaml). `bash examples/prime_70b.sh
# --dry-run` prints the memory plan (8 nodes: ~60 of 80 GiB per GPU; one node cannot hold it).
# For rollout nodes apart from training nodes see examples/prime_70b_disagg.sh.
#
#   bash examples/prime_70b.sh --dry-run [key=value ...]  # no SLURM: launch command, layout,
#                                                         # validated config, memory plan; exit 0
#                                                         # if it can run, non-zero and why if not
#   sbatch examples/prime_70b.sh [key=value ...]          # edit the variables below first
#   (run both from the repository root: the job works in the directory it was submitted from)
#
# Runs as a CHAIN OF REQUEUED JOBS. 592 steps take days at 70B (the paper's 7B step is ~680 s: 592 steps ~112 h), longer
# than most partitions allow. 600 s before the time limit Slurm sends USR1 to this script
# (--signal=B:USR1@600), which forwards it to every rank; the trainer finishes its current step,
# all ranks agree on that step, write a complete checkpoint and exit 0, and the script requeues
# the job (scontrol requeue, allowed by --requeue). The requeued job resumes from the latest
# checkpoint (checkpoint.resume=latest) with no flag. When training is done, the chain ends.
# SIGTERM (preemption, scancel) is forwarded the same way, without requeueing: a preempting
# partition with PreemptMode=REQUEUE requeues by itself.
#SBATCH --job-name=prime-70b
#SBATCH --nodes=8
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
CONFIG=${CONFIG:-examples/configs/prime_70b.yaml}
MODEL_DIR=${MODEL_DIR:-/path/to/Llama-3.1-70B-SFT}        # HF checkpoint (megatron-prime sft output, or the base)
DATA_DIR=${DATA_DIR:-/path/to/Eurus-2-RL-Data}             # train.parquet, validation.parquet
OUT_DIR=${OUT_DIR:-outputs/prime_70b}                       # checkpoints, HF exports, logs
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
