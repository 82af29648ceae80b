#!/usr/bin/env bash
# Llama-3.1-8B SFT on one node of 8 H100-80GB (layout: examples/configs/llama3.1_8b.yaml).
#   sbatch launch/sft_8b.sh [section.key=value ...]      # from the repository root
# Environment variables and the stop/requeue protocol: launch/slurm_job.sh and launch/README.md.
#SBATCH --job-name=sft-8b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the per-GPU ranks
#SBATCH --gpus-per-node=8
#SBATCH --exclusive
#SBATCH --mem=0
#SBATCH --time=24:00:00
# 5 minutes: a ~13 s step plus a ~100 GB checkpoint.
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -euo pipefail
export CONFIG=${CONFIG:-examples/configs/llama3.1_8b.yaml}
# Inside the job this file is a spool copy: the body is found in the submit directory. Outside a
# job (`bash launch/sft_8b.sh`), the body submits this script (SFT_SCRIPT) with sbatch.
export SFT_SCRIPT=$0
exec bash "${MEGASFT_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_job.sh" "$@"
