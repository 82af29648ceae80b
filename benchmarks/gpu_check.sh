#!/usr/bin/env bash
# The GPU check: one script for a lent H100/H200 with the machine's own torch (nothing installed,
# nothing downloaded; flash-attn / transformer-engine used only when they import). Under 8 minutes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (default: runs/gpu_check)
#
# Sections, each reported PASS / SKIP (with the reason) / FAIL in OUT_DIR/gpu_check.txt:
#   1. the CUDA-only tests (pytest -m cuda: attention backends, fused norm kernels, FP8 with TE)
#   2. a bf16 train run of the tiny chat example on CUDA (world 1, NCCL), checking the loss falls
#   3. benchmarks/gpu_mfu.py, ~1B Llama at seq 4096 packed, per available attention backend and
#      norm_backend=torch|compile
# Without CUDA it runs what it can (the tests skip themselves, training runs GPU_CHECK_STEPS steps
# on the CPU, the MFU section is skipped), so the test suite can run it and it cannot rot
# (tests/test_gpu_check.py). Exit status: 1 if any section failed.
#
# Knobs: GPU_CHECK_STEPS (train steps, default 50), GPU_CHECK_MFU_STEPS (timed MFU steps, 5),
# GPU_CHECK_SECTIONS (default "tests train mfu"), GPU_CHECK_DATA (a folder already holding the
# example's tokenizer.model and preprocessed train split: skips making them).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_check}
mkdir -p "$OUT"
REPORT="$OUT/gpu_check.txt"
STEPS=${GPU_CHECK_STEPS:-50}
MFU_STEPS=${GPU_CHECK_MFU_STEPS:-5}
SECTIONS=${GPU_CHECK_SECTIONS:-tests train mfu}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # the checkout, without installing it
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
FAILED=0

CUDA=$(python -c 'import torch; print(int(torch.cuda.is_available()))' 2>/dev/null || echo 0)
DEVICE=$(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU")' 2>/dev/null)
{
  echo "# megasft GPU check — $(date -u '+%Y-%m-%d %H:%M UTC') — $DEVICE"
  python -c 'import torch; print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")'
  for mod in flash_attn transformer_engine transformers sentencepiece; do
    python -c "import $mod" 2>/dev/null && echo "$mod: available" || echo "$mod: not installed"
  done
} > "$REPORT"

section() { echo "" >> "$REPORT"; echo "## $1" >> "$REPORT"; echo "== $1"; }
result() { echo "$1" | tee -a "$REPORT"; [[ "$1" == FAIL* ]] && FAILED=1; return 0; }
wants() { [[ " $SECTIONS " == *" $1 "* ]]; }

if wants tests; then
  section "1. CUDA-only tests (pytest -m cuda)"
  python -m pytest tests -m cuda -q -rs -p no:cacheprovider > "$OUT/tests.log" 2>&1
  rc=$?
  tail -n 25 "$OUT/tests.log" >> "$REPORT"
  # 5: nothing collected; on CPU every test skips itself (the -rs lines above say why).
  if [[ $rc == 0 || $rc == 5 ]]; then result "PASS (exit $rc)"; else result "FAIL (pytest exit $rc, $OUT/tests.log)"; fi
fi

if wants train; then
  # CPU: fp32 (bf16 matmuls crawl there) and 4 rows a step instead of 16, to stay a smoke test.
  PRECISION=$([[ $CUDA == 1 ]] && echo bf16 || echo fp32)
  BATCH=$([[ $CUDA == 1 ]] && echo 4096 || echo 1024)
  section "2. tiny chat example, $PRECISION, $STEPS steps, world 1"
  DATA=${GPU_CHECK_DATA:-$OUT/tiny_data}
  if [[ -z "${GPU_CHECK_DATA:-}" ]] && ! python -c 'import sentencepiece' 2>/dev/null; then
    result "SKIP: sentencepiece is not installed (make_data.py trains the example's tokenizer)"
  else
    : > "$OUT/train.log"
    if { [[ -n "${GPU_CHECK_DATA:-}" ]] || {
           python examples/tiny_chat/make_data.py --out "$DATA" >> "$OUT/train.log" 2>&1 &&
           python tools/preprocess_data.py --input "$DATA/train.jsonl" --output "$DATA/train" \
             --tokenizer "$DATA/tokenizer.model" --template llama3 --seq-len 256 --overwrite >> "$OUT/train.log" 2>&1; }; } &&
       python -m torch.distributed.run --standalone --nproc-per-node 1 -m megasft.train \
         --config examples/configs/tiny_chat.yaml parallel.tp=1 parallel.pp=1 parallel.sequence_parallel=false \
         data.train_path="$DATA/train" data.eval_path=null data.tokenizer="$DATA/tokenizer.model" \
         train.steps="$STEPS" train.precision="$PRECISION" train.log_interval=$(( STEPS >= 10 ? STEPS / 10 : 1 )) \
         train.eval_interval=0 data.global_batch_tokens="$BATCH" \
         train.run_dir="$OUT/tiny_run" train.overwrite=true checkpoint.export_hf=false \
         'train.progress_bar="off"' >> "$OUT/train.log" 2>&1; then
      verdict=$(python - "$OUT/tiny_run/metrics.jsonl" <<'EOF'
import json, sys
losses = [r["loss"] for r in map(json.loads, open(sys.argv[1])) if r.get("kind") == "train"]
first, last = losses[0], losses[-1]
ok = last < 0.8 * first   # from ln(512) ~ 6.2 the tiny model falls well below 80 % in a few dozen steps
print(("PASS" if ok else "FAIL") + f": loss {first:.3f} -> {last:.3f} over {len(losses)} log points")
EOF
)
      grep -E "^step" "$OUT/train.log" | tail -n 3 >> "$REPORT"
      result "$verdict ($PRECISION)"
    else
      tail -n 20 "$OUT/train.log" >> "$REPORT"
      result "FAIL: the train run exited non-zero ($OUT/train.log)"
    fi
  fi
fi

if wants mfu; then
  section "3. gpu_mfu.py, ~1B Llama, seq 4096 packed, bf16"
  if [[ $CUDA != 1 ]]; then
    result "SKIP: no CUDA device"
  else
    BACKENDS=$(python - <<'EOF'
import sys
import torch
from megasft.model.attention import resolve_backend
found = []
for name in ("sdpa", "torch_varlen", "flash_attn"):
    try:
        resolve_backend(name, torch.device("cuda"))
        found.append(name)
    except Exception as e:   # the reason goes to the report
        print(f"# {name}: {e}", file=sys.stderr)
print(" ".join(found))
EOF
)
    echo "attention backends available: $BACKENDS" >> "$REPORT"
    # Every backend with the torch norm, then the compiled norm on the last (fastest) one: at most
    # 4 runs of ~1 min within the 8-minute budget.
    BEST=${BACKENDS##* }
    for variant in $(for b in $BACKENDS; do echo "$b:torch"; done) "$BEST:compile"; do
      backend=${variant%%:*} norm=${variant##*:}
      echo "### attention_backend=$backend norm_backend=$norm" >> "$REPORT"
      if timeout 150 python benchmarks/gpu_mfu.py --steps "$MFU_STEPS" --warmup 2 --rows 4 \
           model.attention_backend="$backend" model.norm_backend="$norm" > "$OUT/mfu_${backend}_${norm}.log" 2>&1; then
        tail -n 6 "$OUT/mfu_${backend}_${norm}.log" >> "$REPORT"
        result "PASS ($backend, $norm)"
      else
        tail -n 10 "$OUT/mfu_${backend}_${norm}.log" >> "$REPORT"
        result "FAIL ($backend, $norm: $OUT/mfu_${backend}_${norm}.log)"
      fi
    done
  fi
fi

echo "" >> "$REPORT"
echo "report: $REPORT"
exit $FAILED
