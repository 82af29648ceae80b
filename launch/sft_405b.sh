#!/usr/bin/env bash
# Llama-3.1-405B SFT on 128 nodes x 8 H100-80GB (layout and its reasons: examples/configs/llama3.1_405b.yaml).
#
#   sbatch launch/sft_405b.sh                               # from the repository root
#   OVERRIDES="train.steps=2000 optim.lr=5e-6" sbatch launch/sft_405b.sh
#
# The #SBATCH lines are the 405B allocation; sbatch options on the command line win over them, and
# everything inside the job comes from environment variables (launch/slurm_job.sh lists them). The
# same script trains the tiny CPU example on one node:
#
#   CONFIG=examples/configs/tiny_chat.yaml GPUS_PER_NODE=0 \
#     sbatch --nodes=1 --gpus-per-node=0 --time=60 launch/sft_405b.sh train.steps=50
#
# Outside a job, `NODES=1 GPUS_PER_NODE=0 TIME_LIMIT=60 bash launch/sft_405b.sh ...` submits itself
# with those sizes. Keep --time well above the --signal lead below.
#
#SBATCH --job-name=sft-405b
#SBATCH --nodes=128
#SBATCH --ntasks-per-node=1          # one torchrun per node; it starts the per-GPU ranks
#SBATCH --gpus-per-node=8
#SBATCH --exclusive                  # the whole node: all CPUs, NICs and GPU memory bandwidth
#SBATCH --mem=0                      # all of the node's memory (checkpoint staging, data loaders)
#SBATCH --time=24:00:00
# B: = signal the batch shell, whose trap forwards USR1 to every rank through srun. 15 minutes
# leaves room to finish a ~30 s step and write a ~5.7 TB checkpoint before the time limit.
#SBATCH --signal=B:USR1@900
#SBATCH --requeue                    # the job requeues itself after a USR1 stop
#SBATCH --open-mode=append           # a requeued attempt appends to the same job log
#SBATCH --output=%x-%j.out           # per job, in the submit directory; per-node logs go to RUN_DIR/logs
set -euo pipefail
export CONFIG=${CONFIG:-examples/configs/llama3.1_405b.yaml}
# Inside the job this file is a spool copy: the body is found in the submit directory. Outside a
# job (`bash launch/sft_405b.sh`), the body submits this script (SFT_SCRIPT) with sbatch.
export SFT_SCRIPT=$0
exec bash "${MEGASFT_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}/launch/slurm_job.sh" "$@"
