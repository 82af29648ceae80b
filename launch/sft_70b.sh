#!/usr/bin/env bash
# Llama-3.1-70B SFT on 8 nodes x 8 H100-80GB (layout: examples/configs/llama3.1_70b.yaml).
#   sbatch launch/sft_70b.sh [section.key=value ...]     # from the repository root
# Environment variables and the stop/requeue protocol: launch/slurm_job.sh and launch/README.md.
#SBATCH --job-name=sft-70b
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the per-GPU ranks
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
# 10 minutes: a ~37 s step plus a ~1 TB checkpoint.
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
export CONFIG=${CONFIG:-examples/configs/llama3.1_70b.yaml}
# Inside the job this file is a spool copy: the body is found in the submit directory. Outside a
# job (`bash launch/sft_70b.sh`), the body submits this script (SFT_SCRIPT) with sbatch.
export SFT_SCRIPT=$0
exec bash "${MEGASFT_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_job.sh" "$@"
