#!/usr/bin/env bash
# Single-node training without Slurm, for debugging a config before submitting it.
#
#   launch/torchrun_local.sh 8b   [section.key=value ...]   # Llama-3.1-8B on this node's 8 GPUs
#   launch/torchrun_local.sh 70b parallel.pp=4 model.num_layers=20 model.init_from_hf=null
#                                                           # 70B shapes, 20 random layers on one node
#   launch/torchrun_local.sh tiny train.steps=20            # the tiny chat example, 4 CPU ranks
#   launch/torchrun_local.sh path/to/config.yaml ...
#
# Environment: NPROC_PER_NODE (default: the GPU count, 4 without GPUs), RUN_DIR (default: the
# config's train.run_dir), VENV (virtualenv to activate).
# It runs `megasft train --nproc N` (torchrun's agent inside the megasft process: a configuration
# or start-up error is one line, checked before any rank starts; megasft/launch.py).
# To try the preemption path: `pkill -USR1 -P <pid of this script>` (it execs that agent, whose
# children are the ranks; the agent puts each in its own session, so a process-group signal misses
# them): every rank finishes its step, saves and exits, as on Slurm; rerun with checkpoint.load=auto.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -ge 1 ]] || { sed -n '2,14p' "$0" >&2; exit 2; }
case $1 in
  8b|70b|405b) CONFIG=examples/configs/llama3.1_$1.yaml ;;
  tiny)        CONFIG=examples/configs/tiny_chat.yaml ;;
  *)           CONFIG=$1 ;;
esac
shift
[[ -f "$CONFIG" ]] || { echo "torchrun_local: config $CONFIG not found" >&2; exit 2; }
if [[ -n "${VENV:-}" ]]; then source "$VENV/bin/activate"; fi

GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
NPROC_PER_NODE=${NPROC_PER_NODE:-$(( GPUS > 0 ? GPUS : 4 ))}
overrides=()
if [[ -n "${RUN_DIR:-}" ]]; then overrides+=("train.run_dir=$RUN_DIR"); fi
if (( GPUS > 0 )); then
  # Same CUDA settings as the Slurm jobs (reasons in launch/slurm_job.sh).
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
else
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
fi

# torchrun's agent has no USR1 handler and would die on a stray USR1, orphaning the ranks; an
# inherited SIG_IGN keeps it alive while each rank's Trainer installs its own handler.
trap '' USR1
# A private c10d rendezvous on a free localhost port (torchrun --standalone).
exec python -m megasft train --nproc "$NPROC_PER_NODE" --config "$CONFIG" "${overrides[@]}" "$@"
