"""Data-parallel communication overlap: train-step time with ZeRO-1 at DP=2 (gloo, one process per
rank), without overlap vs the bucketed grad reduce-scatter overlapped with backward vs that plus the
parameter all-gather overlapped with the next forward.

    python benchmarks/dp_overlap.py [--steps 4] [--seq-len 256] [--hidden 512] [--vocab 16000]

It starts itself under torchrun (2 ranks on this machine). Every rank builds the three trainers
from the same weights and trains them on the same packed batches, interleaved A B C A B C after a
warm-up step, so machine load hits every side alike; rank 0 prints the median step times and the
ratio against no overlap. Overlap changes when communication runs, not what it computes: the final
weights are compared (checked).

On a CPU machine the gloo collectives and the compute share the same few cores, so this mostly
shows that overlap costs nothing; the gain is a GPU-cluster effect (NCCL on its own stream).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist

from common import (add_model_args, bench_config, format_table, interleaved_times, lognormal_lengths,
                    median, pack_steps, packed_micro_batches, relaunch_under_torchrun, sft_documents, spread)
from megasft.hf.names import canonical_pieces
from megasft.parallel_state import ParallelState
from megasft.training.loop import Trainer

VARIANTS = {
    "no overlap": {},
    "grad reduce-scatter overlap": {"overlap_grad_reduce": True},
    "+ param all-gather overlap": {"overlap_grad_reduce": True, "overlap_param_gather": True},
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per side (after one warm-up step)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows-per-rank", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=16.0)
    add_model_args(ap, vocab=16000, hidden=512, ffn=1376, layers=4, heads=8, kv_heads=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args) -> None:
    torch.set_num_threads(args.threads or 1)
    ps = ParallelState.from_env()
    rows = args.rows_per_rank * ps.dp
    rng = np.random.default_rng(args.seed)
    lengths = lognormal_lengths(rows * 8, 100.0, 1.0, args.seq_len, 8, rng)
    docs = sft_documents(lengths, args.vocab, rng)
    steps = pack_steps(docs, args.seq_len, rows)
    trainers = {}
    for name, parallel in VARIANTS.items():
        cfg = bench_config(args, args.seq_len, rows, args.rows_per_rank, args.steps + 1, lr=1e-4)
        cfg.parallel.distributed_optimizer, cfg.parallel.dp = True, None
        cfg.parallel.bucket_size_mb = args.bucket_mb
        for key, value in parallel.items():
            setattr(cfg.parallel, key, value)
        cfg.validate()   # the Trainer resolves the layout for ps.world_size
        torch.manual_seed(args.seed)   # random init: the same weights for every side
        trainers[name] = Trainer(cfg, ps, log=False)

    def runner(trainer):
        def step(i: int):
            step_rows = steps[i % len(steps)]
            mine = step_rows[ps.dp_rank * args.rows_per_rank:(ps.dp_rank + 1) * args.rows_per_rank]
            trainer.train_step(packed_micro_batches(docs, mine, args.seq_len, args.rows_per_rank))
        return step

    times = interleaved_times({n: runner(t) for n, t in trainers.items()}, steps=args.steps, warmup=1,
                              sync=lambda: dist.barrier())
    finals = []
    for trainer in trainers.values():
        trainer.optimizer.finish_param_sync()
        finals.append(torch.cat([p.flatten() for c in trainer.chunks for *_, p in canonical_pieces(c)]))
    # The two overlapped sides share one bucket layout, so they must agree bit for bit; against the
    # single bucket of "no overlap" the grad norm sums in another order, a rounding difference
    # that Adam's m / sqrt(v) enlarges on near-zero gradients.
    same_buckets = float((finals[2] - finals[1]).abs().max())
    drift = float((finals[1] - finals[0]).abs().max())
    if ps.rank == 0:
        n = sum(p.numel() for p in trainers["no overlap"].params)
        base = median(times["no overlap"])
        table = [(name, spread(ts), f"{base / median(ts):.2f}x") for name, ts in times.items()]
        print(f"DP={ps.dp} ZeRO-1 over gloo, {n:,} params (fp32), {args.rows_per_rank} x {args.seq_len} "
              f"tokens per rank per step, buckets of {args.bucket_mb} MiB, torch {torch.__version__}, "
              f"{torch.get_num_threads()} thread(s) per rank")
        print(format_table(["side", "step s (median [min..max])", "vs no overlap"], table))
        print(f"max weight difference after {args.steps + 1} steps: param all-gather overlap on vs off "
              f"{same_buckets:.1e} (must be 0); bucketed vs one bucket {drift:.1e} (rounding, lr {1e-4})")
    if same_buckets or drift > 1e-4:
        raise SystemExit(f"overlap changed the result: weights differ by {max(same_buckets, drift):.2e}")
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    relaunch_under_torchrun("dp_overlap.py", 2, argv)


if __name__ == "__main__":
    main()
