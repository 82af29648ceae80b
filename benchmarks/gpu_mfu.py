"""Single-GPU MFU and tokens/s of megasft's full train step: a ~1B Llama (Llama-3.2-1B shape), rows
of 4096 packed tokens, bf16 with fp32 main params, AdamW, one process.

    python benchmarks/gpu_mfu.py [--steps 10] [--warmup 3] [--rows 8] [--peak-tflops X] [section.key=value ...]

Overrides select the fast paths to measure, e.g. ``model.norm_backend=compile``,
``model.loss_chunk_tokens=4096``, ``optim.adamw_kernel=reference`` (the baseline of the fused one).

Model FLOPs per step (Narayanan et al. 2021 eq. 3; megasft.training.metrics.step_model_flops):

    6 * N_matmul * T  +  12 * L * (heads * head_dim) * sum(len_doc^2)

N_matmul = matmul weights (q/k/v/o, gate/up/down of every layer, the LM head; the embedding lookup
and norms are not GEMMs), T = packed token slots of the step, L = layers, and the attention square
is counted per document because a token only attends inside its own document (full square, not
the causal half, as PaLM's MFU does). MFU = model FLOPs / step time / peak dense bf16 FLOP/s.
The planner's prediction for the same config is printed next to the measurement.

Without CUDA the FLOPs and the planner's prediction are printed and the script exits with a
message (status 0: nothing to measure here is not an error of the benchmark).
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from common import (interleaved_times, lognormal_lengths, median, pack_steps, packed_micro_batches,
                    sft_documents, spread)
from megasft.config import Config, apply_override
from megasft.planner import Assumptions, forward_flops_per_token, make_cluster, plan
from megasft.planner.flops import layer_matmul_parameters
from megasft.training.metrics import attention_squares, step_model_flops

# Llama-3.2-1B (Meta's config.json): 16 layers, width 2048, GQA 32/8 heads, tied 128k embedding.
LLAMA_1B = {
    "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_layers": 16,
    "num_attention_heads": 32, "num_kv_heads": 8, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                     "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    "max_position_embeddings": 131072, "tie_embeddings": True,
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--rows", type=int, default=8, help="packed rows per optimizer step")
    ap.add_argument("--micro-batch-rows", type=int, default=1)
    ap.add_argument("--median", type=float, default=800.0, help="median document length (tokens)")
    ap.add_argument("--sigma", type=float, default=1.0)
    ap.add_argument("--recompute", default="none", choices=("none", "selective", "full"))
    ap.add_argument("--gpu", default=None, help="planner GPU key (default: guessed from the device name)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak dense bf16 TFLOP/s (default: the GPU's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("overrides", nargs="*", help="section.key=value config overrides, as for training")
    return ap.parse_args(argv)


def make_config(args) -> Config:
    raw = {
        "model": {**LLAMA_1B, "recompute": args.recompute},
        "data": {"seq_len": args.seq_len, "global_batch_tokens": args.rows * args.seq_len,
                 "micro_batch_size": args.micro_batch_rows},
        "train": {"steps": args.warmup + args.steps, "precision": "bf16", "seed": args.seed, "progress_bar": "off"},
    }
    for item in args.overrides:
        apply_override(raw, item)
    return Config.from_dict(raw).validate()


def guess_gpu(name: str) -> str:
    """The planner's GPU key for a CUDA device name (H100 PCIe and SXM differ in peak FLOP/s)."""
    name = name.lower()
    for needle, key in (("h200", "h200-141gb"), ("h100 pcie", "h100-pcie-80gb"), ("h100", "h100-80gb"),
                        ("b200", "b200-180gb"), ("a100-sxm4-40gb", "a100-40gb"), ("a100", "a100-80gb"),
                        ("mi300", "mi300x-192gb")):
        if needle in name:
            return key
    return "h100-80gb"


def synthetic_steps(args, vocab: int, count: int) -> list[list[dict]]:
    """`count` global batches of packed rows over long-tailed random-token documents."""
    rng = np.random.default_rng(args.seed)
    lengths = []
    while sum(lengths) < count * args.rows * args.seq_len * 1.1:
        lengths.extend(lognormal_lengths(256, args.median, args.sigma, args.seq_len, 16, rng).tolist())
    # Throughput does not depend on what is learnable; 64 successors keeps the bigram table small.
    docs = sft_documents(lengths, vocab, rng, successors=64)
    return [packed_micro_batches(docs, rows, args.seq_len, args.micro_batch_rows)
            for rows in pack_steps(docs, args.seq_len, args.rows)[:count]]


def describe_flops(cfg: Config, tokens: int, sum_sq: int) -> str:
    m = cfg.model
    n_matmul = m.num_layers * layer_matmul_parameters(m) + m.hidden_size * m.vocab_size
    gemm = 3 * forward_flops_per_token(m, seq_len=0) * tokens
    attention = 12 * m.num_layers * m.num_attention_heads * m.head_size * sum_sq
    total = step_model_flops(m, tokens, {None: sum_sq})   # the 1B Llama has no sliding windows
    assert abs(gemm + attention - total) <= 1e-6 * total, "formula text out of sync with step_model_flops"
    return (f"model FLOPs/step = 6*N_matmul*T + 12*L*(heads*head_dim)*sum(len_doc^2)\n"
            f"  = 6*{n_matmul:,}*{tokens:,} + 12*{m.num_layers}*{m.num_attention_heads * m.head_size}*{sum_sq:,}\n"
            f"  = {gemm / 1e12:,.2f} + {attention / 1e12:,.2f} = {total / 1e12:,.2f} TFLOP "
            f"({total / tokens / 1e9:.2f} GFLOP per token)")


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = make_config(args)
    cuda = torch.cuda.is_available()
    gpu_key = args.gpu or (guess_gpu(torch.cuda.get_device_name()) if cuda else "h100-80gb")
    cluster = make_cluster(1, 1, gpu_key, peak_tflops=args.peak_tflops)
    predicted = plan(cfg, cluster, Assumptions())
    steps = synthetic_steps(args, cfg.model.vocab_size, 3)
    tokens = args.rows * args.seq_len
    sum_sq = int(np.mean([attention_squares(cfg.model, s)[None] for s in steps]))
    print(f"model: Llama-3.2-1B shape, {predicted.parameters:,} parameters; bf16, recompute {args.recompute}; "
          f"{args.rows} rows x {args.seq_len} packed tokens per step ({args.micro_batch_rows} per micro-batch)"
          + (f"; overrides: {' '.join(args.overrides)}" if args.overrides else ""))
    print(describe_flops(cfg, tokens, sum_sq))
    print(f"planner ({cluster.gpu.name}, peak {cluster.gpu.peak_tflops:.0f} TFLOP/s): step "
          f"{predicted.step_seconds:.3f} s, {predicted.tokens_per_second:,.0f} tok/s, MFU {100 * predicted.mfu:.1f}% "
          f"(full-square FLOPs of unpacked rows), peak memory {predicted.worst.total / 2**30:.1f} GiB")
    if not cuda:
        print(f"gpu_mfu.py: no CUDA device (torch {torch.__version__}, torch.cuda.is_available() is False); "
              "nothing measured. Run it on a machine with an NVIDIA GPU.")
        return 0
    return measure(cfg, args, steps, cluster.gpu.peak_tflops, tokens)


def measure(cfg: Config, args, steps: list[list[dict]], peak_tflops: float, tokens: int) -> int:
    from megasft.model.attention import resolve_backend
    from megasft.parallel_state import ParallelState
    from megasft.training.loop import Trainer

    ps = ParallelState.single("cuda")
    torch.manual_seed(args.seed)
    trainer = Trainer(cfg, ps, log=False)
    losses = []

    def step(i: int) -> None:
        losses.append(trainer.train_step(steps[i % len(steps)]).loss)

    times = interleaved_times({"megasft": step}, args.steps, args.warmup, sync=torch.cuda.synchronize)["megasft"]
    flops = np.mean([step_model_flops(cfg.model, tokens, attention_squares(cfg.model, steps[i % len(steps)]))
                     for i in range(args.warmup, args.warmup + args.steps)])
    t = median(times)
    trained = np.mean([sum(mb.trained_tokens for mb in s) for s in steps])
    tflops = flops / t / 1e12
    print(f"device: {torch.cuda.get_device_name()}, attention backend "
          f"{resolve_backend(cfg.model.attention_backend, ps.device)}, torch {torch.__version__}")
    print(f"step s median [min..max]: {spread(times)} over {args.steps} steps after {args.warmup} warm-up")
    print(f"tokens/s: {tokens / t:,.0f} (trained {trained / t:,.0f}); {tflops:.1f} TFLOP/s; "
          f"MFU {100 * tflops / peak_tflops:.1f}% of {peak_tflops:.0f}; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB; last loss {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
