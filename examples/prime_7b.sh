#!/usr/bin/env bash
# PRIME on Eurus-2-7B-SFT, paper settings, one node of 8 GPUs (edit paths in the YAML first):
#   sbatch examples/prime_7b.sh
#SBATCH --job-name=prime-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=72:00:00
#SBATCH --output=outputs/prime_7b/slurm-%j.out
set -euo pipefail
mkdir -p outputs/prime_7b
# One task per GPU; megatron-prime reads SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID and takes the
# first node of SLURM_JOB_NODELIST as the rendezvous host.
srun --kill-on-bad-exit=1 python -m megatron_prime.cli train examples/configs/prime_7b.yaml "$@"
