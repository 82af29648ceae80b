"""Full train-step throughput on CPU, one process, fp32: megasft vs transformers + the seed's loop.

    python benchmarks/step_cpu.py [--steps 6] [--warmup 1] [--seq-len 1024] [--rows 8] [--norm-compile]

Three sides, the same tiny Llama weights (written once as a HF directory, loaded by both), the
same documents and hyper-parameters, measured in one run, interleaved A B C A B C after warm-up:

  megasft          Trainer.train_step (ParallelState.single()): packed rows, block-diagonal
                   attention from cu_seqlens, fused masked CE, flat-buffer AdamW, clipping, LR step.
  HF packed rows   LlamaForCausalLM (sdpa) on the *same* packed micro-batches, given input_ids,
                   labels and position_ids only. transformers >= 4.53 detects packing from the
                   position_ids resets and builds a block-diagonal causal mask, so documents are
                   isolated and it does the same attention work as megasft; loop: forward with
                   labels (num_items_in_batch = trained tokens of the step), backward,
                   clip_grad_norm_, torch.optim.AdamW (same param groups), LambdaLR, zero_grad.
  HF padded        the usual no-packing loop: the step's documents one per row, --padded-batch
                   rows per micro-batch, padded to the longest, attention_mask on the padding.
  megasft norm=compile  (with --norm-compile) megasft with model.norm_backend=compile: RMSNorm and
                   SwiGLU through torch.compile; compiled during the warm-up step, which is untimed.

All three train on the same documents per step, so they have the same useful (non-pad) tokens
and the same trained tokens; the losses printed at the end agree when the three computations do.
Document lengths are log-normal (long-tailed; median --median, sigma --sigma, clipped to seq_len).
"""
from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import numpy as np

from common import (add_model_args, bench_config, describe_model, format_table, hf_optimizer,
                    hf_inputs, hf_train_step, interleaved_times, load_hf_twin, lognormal_lengths, median, set_threads,
                    pack_steps, packed_micro_batches, padded_micro_batches, sft_documents, spread,
                    trained_tokens, write_hf_twin)
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side (after warm-up)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--distinct-steps", type=int, default=3, help="different global batches, cycled")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--rows", type=int, default=4, help="packed rows per optimizer step")
    ap.add_argument("--micro-batch-rows", type=int, default=2, help="packed rows per micro-batch")
    ap.add_argument("--padded-batch", type=int, default=4, help="conversations per padded micro-batch")
    ap.add_argument("--median", type=float, default=100.0, help="median document length (tokens)")
    ap.add_argument("--sigma", type=float, default=1.0, help="log-normal shape of document lengths")
    add_model_args(ap, vocab=8192, hidden=256, ffn=688)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--norm-compile", action="store_true",
                    help="add a side: megasft with model.norm_backend=compile (vs the default torch on CPU)")
    return ap.parse_args(argv)


def build_steps(args):
    """(documents, [(packed micro-batches, padded micro-batches)] per distinct step)."""
    rng = np.random.default_rng(args.seed)
    need_tokens = int(args.distinct_steps * args.rows * args.seq_len * 1.15)
    lengths = []
    while sum(lengths) < need_tokens:
        lengths.extend(lognormal_lengths(64, args.median, args.sigma, args.seq_len, 8, rng).tolist())
    docs = sft_documents(lengths, args.vocab, rng)
    steps = []
    for rows in pack_steps(docs, args.seq_len, args.rows)[:args.distinct_steps]:
        packed = packed_micro_batches(docs, rows, args.seq_len, args.micro_batch_rows)
        doc_ids = [d for row in rows for d in row]
        np.random.default_rng(len(steps)).shuffle(doc_ids)   # the usual loop sees documents in random order
        steps.append((packed, padded_micro_batches(docs, doc_ids, args.padded_batch), doc_ids))
    if len(steps) < args.distinct_steps:
        raise SystemExit(f"only {len(steps)} full steps of {args.rows} rows from the generated documents")
    return docs, steps


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args)
    cfg = bench_config(args, args.seq_len, args.rows, args.micro_batch_rows, args.warmup + args.steps, lr=1e-3)
    docs, steps = build_steps(args)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_twin(cfg, Path(tmp) / "hf", args.seed)    # sets cfg.model.init_from_hf: copy cfg after
        configs = {"megasft": cfg}
        if args.norm_compile:
            configs["megasft norm=compile"] = copy.deepcopy(cfg)
            configs["megasft norm=compile"].model.norm_backend = "compile"
        trainers = {name: Trainer(c, ParallelState.single(), log=False) for name, c in configs.items()}
        hf_packed, hf_padded = load_hf_twin(Path(tmp) / "hf"), load_hf_twin(Path(tmp) / "hf")
    opt_packed, opt_padded = hf_optimizer(hf_packed, cfg), hf_optimizer(hf_padded, cfg)
    losses = {name: [] for name in [*trainers, "HF packed rows", "HF padded"]}

    def run_megasft(name):
        return lambda i: losses[name].append(trainers[name].train_step(steps[i % len(steps)][0]).loss)

    def run_hf_packed(i):
        losses["HF packed rows"].append(hf_train_step(hf_packed, *opt_packed, steps[i % len(steps)][0], cfg.optim.clip_grad))

    def run_hf_padded(i):
        losses["HF padded"].append(hf_train_step(hf_padded, *opt_padded, steps[i % len(steps)][1], cfg.optim.clip_grad))

    print(describe(args, docs, steps, trainers["megasft"]))
    runners = {name: run_megasft(name) for name in trainers}
    times = interleaved_times({**runners, "HF packed rows": run_hf_packed, "HF padded": run_hf_padded},
                              args.steps, args.warmup)
    print(report(args, steps, times, losses))


def step_tokens(args, steps, sides) -> dict[str, tuple[float, float, float]]:
    """Per side: mean (token slots, useful tokens, trained tokens) per step over the timed steps;
    every side but HF padded runs the packed rows."""
    timed = [steps[i % len(steps)] for i in range(args.warmup, args.warmup + args.steps)]

    def slots(mbs):
        return sum(hf_inputs(mb)["input_ids"].numel() for mb in mbs)

    useful = np.mean([sum(int(mb["attention_mask"].sum()) for mb in padded) for _, padded, _ in timed])
    trained = np.mean([trained_tokens(packed) for packed, _, _ in timed])
    packed_slots = np.mean([slots(packed) for packed, _, _ in timed])
    padded_slots = np.mean([slots(padded) for _, padded, _ in timed])
    return {name: (padded_slots if name == "HF padded" else packed_slots, useful, trained) for name in sides}


def describe(args, docs, steps, trainer) -> str:
    lengths = np.array([len(ids) for ids, _ in docs])
    per_step = np.mean([len(doc_ids) for _, _, doc_ids in steps])
    return (describe_model(args, sum(p.numel() for p in trainer.params)) + "\n"
            f"documents: log-normal median {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, "
            f"max {lengths.max()} tokens; {per_step:.1f} per step\n"
            f"step: {args.rows} packed rows x {args.seq_len} ({args.micro_batch_rows} rows per micro-batch) | "
            f"padded: {args.padded_batch} conversations per micro-batch\n"
            f"timing: {args.warmup} warm-up + {args.steps} timed steps per side, interleaved; "
            f"{args.distinct_steps} distinct global batches cycled")


def report(args, steps, times, losses) -> str:
    tokens = step_tokens(args, steps, times)
    rows, useful_rate = [], {}
    for name, ts in times.items():
        slots, useful, trained = tokens[name]
        t = median(ts)
        useful_rate[name] = useful / t
        rows.append([name, spread(ts), f"{slots:,.0f}", f"{100 * useful / slots:.1f}%", f"{slots / t:,.0f}",
                     f"{useful / t:,.0f}", f"{trained / t:,.0f}", f"{losses[name][-1]:.4f}"])
    table = format_table(["side", "step s median [min..max]", "slots/step", "useful", "tokens/s",
                          "useful tok/s", "trained tok/s", "last loss"], rows)
    same = useful_rate["megasft"] / useful_rate["HF packed rows"]
    padded = useful_rate["megasft"] / useful_rate["HF padded"]
    packing = useful_rate["HF packed rows"] / useful_rate["HF padded"]
    lines = [table,
             f"packing gain inside transformers (HF packed / HF padded, useful tok/s): {packing:.2f}x",
             f"megasft / HF padded (useful tok/s): {padded:.2f}x",
             f"megasft / HF same packed rows (tokens/s): {same:.2f}x (goal >= 1.0)"]
    if "megasft norm=compile" in useful_rate:
        gain = useful_rate["megasft norm=compile"] / useful_rate["megasft"]
        lines.append(f"megasft norm=compile / norm=torch (tokens/s): {gain:.2f}x")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
