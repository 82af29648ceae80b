"""Measured pipeline bubble of the 1F1B, interleaved, ZB-H1 and ZBV schedules against theory.

    python benchmarks/pipeline_bubble.py [--stages 4] [--micro-batches 4 8 16] [--forward-ms 150]

Cost model: every stage has the same cost, modelled by sleeping — t_f per micro-batch forward and
t_b = 2 t_f per backward on each stage, split evenly over its v chunks when interleaving — inside a
custom autograd function, so the real schedule, p2p (gloo) and autograd drive the timing. Sleeping
rather than computing keeps the numbers clean when 4 processes share 2 cores: a sleeping stage
does not steal CPU from a busy one, as a compute-bound stage would.

Per configuration: one warmup step, then --steps measured steps, each after a barrier so that all
stages start together. The pipeline bubble of a step is 1 - mean(stage busy) / max(stage wall)
(megasft.pipeline.bubble.pipeline_bubble); theory is (p-1)/(m+p-1) for 1F1B and (p-1)/(v m+p-1)
interleaved (Narayanan et al. 2021, Sec. 2.2; see bubble.py for why the fraction of the step), and
(p-1)/(3m+p-1) for ZB-H1 (Qi et al. 2023; its backward is split into equal B and W halves, so
F = B = W = t_f as the formula assumes), and for ZBV (two chunks per rank in a V, each half the
stage: F = B = W = t_f/2 per chunk) its unit-cost timeline, (p-1)/(6m+p-1) for m >= p. Also
reported: the most activations any stage held at once (1F1B: at most p - r micro-batches on
stage r; ZB-H1 counts a micro-batch until its W: at most p on every stage), in (micro-batch,
chunk) units — each half a stage's — for interleaved and ZBV (ZBV: at most 2p). The last column
is each schedule's measured bubble relative to 1F1B's at the same m.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megasft.parallel_state import ParallelState  # noqa: E402
from megasft.layout import INTERLEAVED, ONE_F_ONE_B, ZB_H1, ZBV, bubble_fraction, chunk_ranks  # noqa: E402
from megasft.pipeline.bubble import pipeline_bubble  # noqa: E402
from megasft.pipeline.schedules import forward_backward  # noqa: E402
from megasft.pipeline.weight_grad import WeightGradStore  # noqa: E402

SHAPE = (16, 1, 64)


class SleepStage(torch.autograd.Function):
    """y = x * w, taking `forward_s` seconds forward and `backward_s` backward. With a capturing
    WeightGradStore (zb_h1, zbv) the backward is split as the model's linears split it: half the time
    for the input gradient now, half for the weight gradient in its W pass."""

    @staticmethod
    def forward(ctx, x, w_data, forward_s: float, backward_s: float, store, w_box):
        time.sleep(forward_s)
        ctx.save_for_backward(x, w_data)
        ctx.backward_s, ctx.store, ctx.w = backward_s, store, w_box[0]
        return x * w_data

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        weight_grad = (grad * x).sum().reshape(w.shape)

        def w_pass(seconds: float) -> None:
            time.sleep(seconds)
            torch.autograd.backward(ctx.w, weight_grad)

        if ctx.store is not None and ctx.store.capturing is not None:
            time.sleep(ctx.backward_s / 2)
            ctx.store.capturing.append(lambda: w_pass(ctx.backward_s / 2))
        else:
            time.sleep(ctx.backward_s / 2)
            w_pass(ctx.backward_s / 2)
        return grad * w, None, None, None, None, None


def synthetic_forward_step(weights: list[torch.Tensor], ps: ParallelState, schedule: str, forward_s: float,
                           store=None):
    """Equal-cost chunks: each of the v chunks costs 1/v of the stage."""
    v = len(weights)
    holds_loss = chunk_ranks(schedule, ps.pp, v)[-1] == ps.pp_rank   # the last rank; rank 0 under ZBV

    def step(chunk: int, batch: dict, input_tensor):
        # The weight enters detached (its gradient comes from the W pass), so the first stage's
        # input must carry the graph.
        x = batch["x"].requires_grad_() if input_tensor is None else input_tensor
        w = weights[chunk]
        y = SleepStage.apply(x, w.detach(), forward_s / v, 2 * forward_s / v, store, (w,))
        if holds_loss and chunk == v - 1:
            return y.sum() * 0.0, {"micro_batches": 1}
        return y
    return step


def run_config(ps: ParallelState, schedule: str, v: int, m: int, forward_s: float, steps: int) -> dict:
    weights = [torch.ones(1, requires_grad=True) for _ in range(v)]
    batches = [{"x": torch.randn(SHAPE)} for _ in range(m)]
    store = WeightGradStore() if schedule in (ZB_H1, ZBV) else None
    step = synthetic_forward_step(weights, ps, schedule, forward_s, store)
    bubbles, peaks, stage_idle = [], [], []
    for i in range(steps + 1):
        dist.barrier(group=ps.pp_group)
        result = forward_backward(step, batches, ps, num_chunks=v, tensor_shape=SHAPE,
                                  dtype=torch.float32, schedule=schedule, weight_store=store)
        bubble = pipeline_bubble(result.busy_s, result.wall_s, ps)
        if i:   # the first step warms up gloo connections
            bubbles.append(bubble)
            peaks.append(result.peak_in_flight)
            stage_idle.append(result.bubble_fraction)
    return {"bubble": statistics.median(bubbles), "peak": max(peaks),
            "stage_bubble": statistics.median(stage_idle)}


def rank_main(p: int, ms: list[int], v: int, forward_s: float, steps: int, schedules: list[str]) -> list[dict]:
    ps = ParallelState.build(1, p)
    rows = []
    chunks_of = {ONE_F_ONE_B: 1, INTERLEAVED: v, ZB_H1: 1, ZBV: 2}
    for m in ms:
        for schedule in schedules:
            chunks = chunks_of[schedule]
            out = run_config(ps, schedule, chunks, m, forward_s, steps)
            theory = bubble_fraction(schedule, p, m, chunks)
            name = f"interleaved v={chunks}" if schedule == INTERLEAVED else schedule
            rows.append({"schedule": name, "m": m, "theory": theory, **out})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--virtual", type=int, default=2)
    parser.add_argument("--forward-ms", type=float, default=150.0, help="forward time per stage; backward is 2x")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--schedules", nargs="+", default=[ONE_F_ONE_B, INTERLEAVED, ZB_H1, ZBV],
                        help="the first is the 'vs' column's base")
    args = parser.parse_args()

    from tests.multiproc import run_ranks

    per_rank = run_ranks(rank_main, args.stages, args.stages, args.micro_batches, args.virtual,
                         args.forward_ms / 1000, args.steps, args.schedules, timeout=1800)
    print(f"p={args.stages}, t_f={args.forward_ms:g} ms, t_b=2 t_f per stage; median of {args.steps} steps")
    print(f"{'schedule':<16}{'m':>4}{'theory':>9}{'measured':>10}{'rel.err':>9}  {'peak in-flight':<16}"
          f"vs {args.schedules[0]}")
    base = {}
    for i, row in enumerate(per_rank[0]):
        peaks = [rank_rows[i]["peak"] for rank_rows in per_rank]
        err = (row["bubble"] - row["theory"]) / row["theory"]
        base.setdefault(row["m"], row["bubble"])   # the first schedule of each m
        print(f"{row['schedule']:<16}{row['m']:>4}{row['theory']:>9.3f}{row['bubble']:>10.3f}"
              f"{err:>+9.1%}  {str(peaks):<16}{row['bubble'] / base[row['m']]:.2f}")


if __name__ == "__main__":
    main()
