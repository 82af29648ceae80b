#!/usr/bin/env bash
# The tiny chat example end to end on CPU: synthetic chats + tokenizer, preprocessing, training on
# 4 gloo processes (TP2 x PP2), then greedy answers to held-out prompts. A re-run moves the previous
# run aside (train.overwrite=true: runs/tiny_chat.old-<time>).
# Extra arguments are config overrides, e.g.  bash examples/tiny_chat/run.sh train.steps=50
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=examples/tiny_chat/data
RUN=${RUN_DIR:-runs/tiny_chat}
NPROC=${NPROC:-4}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

# `python -m megasft` is the `megasft` command (pip install -e . puts it on PATH); spelt so the
# script also runs from a checkout that is only on PYTHONPATH.
megasft() { python -m megasft "$@"; }

python examples/tiny_chat/make_data.py --out "$DATA"
for split in train eval; do
  megasft preprocess --input "$DATA/$split.jsonl" --output "$DATA/$split" \
    --tokenizer "$DATA/tokenizer.model" --template llama3 --seq-len 256 --overwrite
done
megasft train --nproc "$NPROC" --config examples/configs/tiny_chat.yaml \
  train.run_dir="$RUN" train.overwrite=true "$@"
megasft eval-generate --model "$RUN/hf" --tokenizer "$DATA/tokenizer.model" --template llama3 \
  --prompts "$DATA/eval.jsonl" -n 40
