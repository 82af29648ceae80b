#!/usr/bin/env bash
# The body of every Slurm training job (launch/sft_405b.sh, sft_70b.sh, sft_8b.sh exec it with
# their defaults). It runs inside the allocation on the batch node, as the batch shell itself:
# the sft_*.sh scripts `exec` it, so Slurm's `--signal=B:USR1@...` reaches the trap below.
#
#   one srun task per node ──▶ torchrun (c10d rendezvous on the first node) ──▶ N ranks of
#   `python -m megasft.train --config $CONFIG checkpoint.load=auto $OVERRIDES ... train.run_dir=$RUN_DIR`
#
# Preemption / time limit: Slurm sends SIGUSR1 to this shell some minutes before the end
# (`--signal=B:USR1@<s>`, or by hand `scancel --batch --signal=USR1 <job>`). The trap forwards it
# to srun, which passes it to every process of the step on every node; each rank's Trainer finishes
# the current optimizer step, saves a checkpoint and exits. This shell then runs
# `scontrol requeue`, and the next start resumes from the checkpoint's `latest` (checkpoint.load=auto).
# A signal sent to the job step instead (`scancel --signal=USR1 <job>`) stops the ranks the same
# way; the shell sees a clean exit short of train.steps in `latest` and requeues too.
#
# Run outside a job (`bash launch/sft_405b.sh`), it submits the sft_*.sh script with sbatch, sized
# by NODES, GPUS_PER_NODE and TIME_LIMIT where set, plus SBATCH_ARGS (e.g. "--partition=gpu").
#
# Environment (everything has a default; the sft_*.sh scripts set the model-specific ones):
#   CONFIG           YAML config, relative to MEGASFT_ROOT or absolute
#   OVERRIDES        extra section.key=value overrides, space-separated (arguments after the script
#                    name on the sbatch command line are appended after them, and win)
#   RUN_DIR          run directory (metrics, checkpoints, logs); default: the config's train.run_dir
#   GPUS_PER_NODE    GPUs per node; 0 runs on CPU (gloo). Default: what Slurm allocated, else 8
#   NPROC_PER_NODE   ranks per node; default GPUS_PER_NODE, or 4 on CPU
#   RDZV_PORT        c10d rendezvous port on the first node (29500)
#   MEGASFT_ROOT     the megasft checkout on a filesystem every node sees (the submit directory)
#   VENV             a virtualenv to activate on every node before anything runs
#   SETUP            shell code evaluated on every node first (module load ..., conda activate ...)
#   SRUN_ARGS        extra srun arguments, e.g. "--container-image=... --container-mounts=..." (pyxis)
#   MAX_REQUEUES     stop requeueing after this many restarts (100)
set -euo pipefail

die() { echo "sft: error: $*" >&2; exit 2; }
log() { echo "$(date -u +%FT%TZ) sft: $*"; }

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
  # Started outside Slurm (`NODES=16 bash launch/sft_405b.sh`): submit the calling sft_*.sh, sized
  # from the environment. Unset sizes keep the script's #SBATCH values; SBATCH_ARGS adds options.
  [[ -n "${SFT_SCRIPT:-}" ]] || die "not inside a Slurm job; submit with sbatch launch/sft_405b.sh (or run launch/torchrun_local.sh on one machine)"
  sbatch_opts=()
  if [[ -n "${NODES:-}" ]]; then sbatch_opts+=("--nodes=$NODES"); fi
  if [[ -n "${GPUS_PER_NODE:-}" ]]; then sbatch_opts+=("--gpus-per-node=$GPUS_PER_NODE"); fi
  if [[ -n "${TIME_LIMIT:-}" ]]; then sbatch_opts+=("--time=$TIME_LIMIT"); fi
  read -r -a sbatch_extra <<<"${SBATCH_ARGS:-}"
  # The job finds the checkout through this, wherever the submission was made from.
  export MEGASFT_ROOT=${MEGASFT_ROOT:-$(cd "$(dirname "$0")/.." && pwd)}
  exec sbatch "${sbatch_opts[@]}" "${sbatch_extra[@]}" "$SFT_SCRIPT" "$@"
fi

# Install the trap before anything slow: a signal during set-up is remembered, not lost.
stop_requested=0
srun_pid=
on_stop_signal() {
  stop_requested=1
  log "got SIGUSR1 (time limit near or preemption): every rank finishes its step, saves and exits"
  if [[ -n "$srun_pid" ]]; then
    kill -USR1 "$srun_pid" 2>/dev/null || true   # srun forwards it to all tasks of the step, on all nodes
  fi
}
trap on_stop_signal USR1

# sbatch runs a copy of the script from the spool directory, so "where am I" is the submit
# directory (or MEGASFT_ROOT), never $0.
MEGASFT_ROOT=${MEGASFT_ROOT:-$SLURM_SUBMIT_DIR}
[[ -f "$MEGASFT_ROOT/megasft/train.py" ]] || die "MEGASFT_ROOT=$MEGASFT_ROOT is not a megasft checkout; submit from the repository root or set MEGASFT_ROOT"
cd "$MEGASFT_ROOT"

# Environment activation, exported so srun runs the same commands on every node.
export VENV=${VENV:-} SETUP=${SETUP:-}
activate='if [[ -n "$VENV" ]]; then source "$VENV/bin/activate"; fi; if [[ -n "$SETUP" ]]; then eval "$SETUP"; fi'
eval "$activate"

: "${CONFIG:?set CONFIG to a YAML config (the sft_*.sh scripts do)}"
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG not found under $MEGASFT_ROOT"
read -r -a user_overrides <<<"${OVERRIDES:-}"
user_overrides+=("$@")

# Auto-resume: the first start finds no checkpoint and starts fresh; a requeued start resumes
# from <checkpoint dir>/latest. User overrides come after it (checkpoint.load=<path> still wins),
# RUN_DIR last (an explicit environment variable beats a value buried in OVERRIDES).
overrides=("checkpoint.load=auto" "${user_overrides[@]}")
if [[ -n "${RUN_DIR:-}" ]]; then overrides+=("train.run_dir=$RUN_DIR"); fi

# Resolve the config exactly as megasft.train will (YAML, then overrides): the run directory for the
# logs, and the checkpoint root and step count that tell a finished run from a stopped one. This
# also rejects a bad YAML or override here, on one CPU, before hundreds of GPUs start.
# (megasft.config imports no torch, so this costs well under a second.)
resolved=$(python -c 'import sys
from megasft.config import Config, ConfigError
try:
    cfg = Config.load(sys.argv[1], sys.argv[2:])
except ConfigError as err:
    sys.exit(f"sft: error: {sys.argv[1]}: {err}")
print(cfg.train.run_dir, cfg.checkpoint.root(cfg.train.run_dir), cfg.train.steps, sep="\n")' \
  "$CONFIG" "${overrides[@]}")
{ read -r RUN_DIR; read -r CKPT_ROOT; read -r TRAIN_STEPS; } <<<"$resolved"

# The step of the newest complete checkpoint (0 without one). `latest` holds its directory name,
# step_<8 digits> (megasft.checkpoint.sharded.step_name), and is replaced atomically.
latest_step() {
  local name
  [[ -f "$CKPT_ROOT/latest" ]] || { echo 0; return; }
  name=$(<"$CKPT_ROOT/latest")
  [[ $name =~ ^step_([0-9]+)$ ]] || die "unexpected $CKPT_ROOT/latest: $name"
  echo $((10#${BASH_REMATCH[1]}))
}

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
if (( GPUS_PER_NODE > 0 )); then
  NPROC_PER_NODE=${NPROC_PER_NODE:-$GPUS_PER_NODE}
  # torchrun would force 1 thread (with a warning); a few help the CPU-side work (packing,
  # checkpoint staging) without 8 ranks oversubscribing the node's cores.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
  # CUDA: one hardware work queue, so kernels run in issue order and the TP/SP collectives
  # overlap with compute exactly as scheduled (Megatron requires this with sequence parallelism).
  export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}
  # Fewer fragmentation OOMs with variable packed-sequence shapes.
  export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
  # A failed or hung collective aborts the rank (and through srun --kill-on-bad-exit the job)
  # instead of burning the allocation until the time limit.
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # Free async-collective buffers when the collective ends instead of via recordStream (less memory).
  export TORCH_NCCL_AVOID_RECORD_STREAMS=${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}
  # WARN keeps logs readable; NCCL_DEBUG=INFO shows the chosen transports (IB/NVLink) when debugging.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # Interfaces and IB HCAs (NCCL_SOCKET_IFNAME, NCCL_IB_HCA) are cluster-specific: set them in SETUP.
else
  NPROC_PER_NODE=${NPROC_PER_NODE:-4}
  # CPU (gloo): share the node's cores between the ranks, at least one thread each.
  cpus=${SLURM_CPUS_ON_NODE:-$(nproc)}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( cpus > NPROC_PER_NODE ? cpus / NPROC_PER_NODE : 1 ))}
fi

# The first node of the allocation hosts the c10d rendezvous store (torchrun's agent there serves it).
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
HEAD_NODE=${nodes[0]:-}
[[ -n "$HEAD_NODE" ]] || die "scontrol show hostnames '$SLURM_JOB_NODELIST' returned no node"
RDZV_PORT=${RDZV_PORT:-29500}
ATTEMPT=${SLURM_RESTART_COUNT:-0}
LOG_DIR=$RUN_DIR/logs
mkdir -p "$LOG_DIR"
read -r -a srun_extra <<<"${SRUN_ARGS:-}"

log "job $SLURM_JOB_ID attempt $ATTEMPT: $SLURM_NNODES node(s) x $NPROC_PER_NODE rank(s), head $HEAD_NODE:$RDZV_PORT"
log "config $CONFIG, overrides: ${overrides[*]}"
log "per-node logs: $LOG_DIR/$SLURM_JOB_ID.$ATTEMPT.<node>.log"

start_step=$(latest_step)
if (( stop_requested )); then
  step=$start_step
  log "stop requested during set-up, before the ranks started"
else
  # Per node: one torchrun with USR1 ignored. torchrun's agent has no USR1 handler, so the default
  # action would kill it and orphan its ranks mid-step; ignoring it keeps the agent alive, while each
  # rank's Trainer installs its own handler (an inherited SIG_IGN can be replaced, unlike a trap).
  # --kill-on-bad-exit: one failed node ends the step instead of leaving the others hung in a
  # collective; --cpus-per-task: without it a step task may be confined to a single core.
  srun --nodes="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="${SLURM_CPUS_ON_NODE:-1}" \
       --kill-on-bad-exit=1 --output="$LOG_DIR/%j.$ATTEMPT.%N.log" "${srun_extra[@]}" \
       bash -c "$activate"'; trap "" USR1; exec "$@"' megasft-node \
       torchrun --nnodes="$SLURM_NNODES" --nproc-per-node="$NPROC_PER_NODE" \
                --rdzv-backend=c10d --rdzv-endpoint="$HEAD_NODE:$RDZV_PORT" --rdzv-id="$SLURM_JOB_ID.$ATTEMPT" \
                --max-restarts=0 \
                -m megasft.train --config "$CONFIG" "${overrides[@]}" &
  srun_pid=$!
  # `wait` returns early (status > 128) when the trap fires; keep waiting until srun has exited.
  while :; do
    rc=0
    wait "$srun_pid" || rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break
  done
  srun_pid=
  step=$(latest_step)
  log "training step ended with status $rc; latest checkpoint at step $step of $TRAIN_STEPS"
  # Finished (possibly just as a stop signal arrived): nothing to requeue.
  if (( rc == 0 && step >= TRAIN_STEPS )); then exit 0; fi
  if (( ! stop_requested )); then
    # The ranks exit 0 both when done and when stopped by a USR1/TERM sent straight to the job
    # step (`scancel --signal=USR1 <job>`, or --signal without B:), and torchrun reports any rank
    # failure as status 1: so a clean exit short of train.steps means "stopped on request".
    (( rc == 0 )) || exit "$rc"
    log "the ranks stopped early on a signal sent to the job step"
  fi
fi

# Stopped on request: the ranks saved a checkpoint (atomic, so even a failure while stopping leaves
# the previous `latest` intact). Requeue keeps the job id, so the next start finds the same run dir.
# Without a new checkpoint a requeue would only repeat this start; the usual cause is a time limit
# shorter than the --signal lead, which makes Slurm signal every start at once.
if (( step <= start_step )); then
  die "stopped without a new checkpoint (latest at step $step, as at the start); not requeueing." \
      "Is --time shorter than the --signal lead? Resubmitting resumes from latest."
fi
MAX_REQUEUES=${MAX_REQUEUES:-100}
if (( ATTEMPT >= MAX_REQUEUES )); then
  die "already restarted $ATTEMPT times (MAX_REQUEUES=$MAX_REQUEUES); not requeueing"
fi
log "requeueing job $SLURM_JOB_ID (restart $((ATTEMPT + 1)))"
scontrol requeue "$SLURM_JOB_ID"
exit 0
