"""Optimizer step time: megasft's AdamW with torch's fused kernel vs its reference kernel, and
torch.optim.AdamW (foreach, torch's default) on the same parameters, one process.

    python benchmarks/optimizer_step.py [--params 32] [--steps 7] [--threads N]

Each side updates the same parameter set (--params million fp32 elements in weight matrices of
1024 columns, plus norm-like 1-D params; decay on the matrices only) from the same gradients:
megasft's step is grad-norm + clip + decoupled decay + Adam over its flat ZeRO shard (one process:
the shard is everything); torch.optim.AdamW is given clip_grad_norm_ too, so the sides do the same
work. Runs are interleaved A B C A B C after one warm-up step; the table shows median step time and
the ratio against the reference kernel.
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

from common import format_table, interleaved_times, median, spread
from megasft.config import OptimConfig, ParallelConfig
from megasft.optim.distributed_optimizer import DistributedOptimizer
from megasft.parallel_state import ParallelState


def make_params(millions: float, seed: int) -> list[tuple[str, nn.Parameter]]:
    g = torch.Generator().manual_seed(seed)
    cols, rows = 1024, 4096
    n_mats = max(1, round(millions * 1e6 / (rows * cols)))
    params = [(f"w{i}", nn.Parameter(torch.randn(rows, cols, generator=g) * 0.02)) for i in range(n_mats)]
    params += [(f"norm{i}", nn.Parameter(torch.ones(cols))) for i in range(n_mats)]
    return params


def megasft_side(kernel: str, args, grads: list[torch.Tensor]):
    named = make_params(args.params, args.seed)
    opt = DistributedOptimizer(named, OptimConfig(lr=1e-4, adamw_kernel=kernel), ParallelConfig(),
                               ParallelState.single(), lambda step: 1e-4)

    def step(i: int):
        opt.zero_grad()
        for (_, p), g in zip(named, grads):
            opt.grad_buffer.main_grad(p).copy_(g)
        opt.step()
    return step, sum(p.numel() for _, p in named)


def torch_side(args, grads: list[torch.Tensor]):
    params = [p for _, p in make_params(args.params, args.seed)]
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=1e-4, betas=(0.9, 0.95), eps=1e-8)

    def step(i: int):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--params", type=float, default=32, help="million parameters")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed + 1)
    grads = [torch.randn(p.shape, generator=g) * 1e-3 for _, p in make_params(args.params, args.seed)]
    fused, n = megasft_side("fused", args, grads)
    reference, _ = megasft_side("reference", args, grads)
    times = interleaved_times({"megasft fused": fused, "megasft reference": reference,
                               "torch.optim.AdamW (foreach)": torch_side(args, grads)},
                              steps=args.steps, warmup=1)
    base = median(times["megasft reference"])
    rows = [(name, spread(ts), f"{n / median(ts) / 1e6:.0f}", f"{base / median(ts):.2f}x")
            for name, ts in times.items()]
    print(f"AdamW step over {n:,} fp32 params, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(format_table(["side", "step s (median [min..max])", "M params/s", "vs reference"], rows))
    print(f"fused / reference: {base / median(times['megasft fused']):.2f}x")


if __name__ == "__main__":
    main()
