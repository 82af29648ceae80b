"""Mixture-of-experts token dispatch: all-to-all bytes per step measured by the ledger
(megasft.collectives) against the planner's analytic volume (megasft.planner.moe.alltoall_bytes,
through megasft.planner.comm.predicted_bytes), and the step time of the grouped expert GEMMs
(model.moe_experts_backend=grouped_mm, torch._grouped_mm) against the per-expert loop.

    python benchmarks/moe_dispatch.py [--seq-len 256] [--hidden 256] [--experts 16] [--ffn 256]

1. Timing, in this process: one MoE layer (Mixtral-style, --experts experts of width --ffn, top-2)
   forward + backward on --seq-len x --rows tokens, loop vs grouped_mm interleaved (A B A B ...),
   median [min..max] of --steps steps after --warmup.
2. Bytes, on 4 gloo ranks under torchrun: for each layout, one warm-up and one counted train step
   on packed long-tailed documents; per layout the largest "ep" bytes any rank sent, the planner's
   bytes for that rank and their ratio. The analytic volume assumes uniform routing, so two routings
   are measured: the model's own (random-init router: the ratio shows how far its choices are
   from uniform) and a forced uniform one (token t's j-th pick is expert (t*k + j) mod E, the
   router's output otherwise untouched), where the formula is exact and the ratio must be 1.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist

from common import (add_model_args, bench_config, format_table, interleaved_times, lognormal_lengths,
                    pack_steps, packed_micro_batches, relaunch_under_torchrun, sft_documents, spread)
from megasft import collectives
from megasft.model import router as router_module
from megasft.model.moe import MoE
from megasft.parallel_state import ParallelState
from megasft.planner.comm import predicted_bytes
from megasft.planner.pinned import pin
from megasft.training.loop import Trainer

# name: (tp, sequence parallel, ep, recompute, cp)
LAYOUTS = {
    "EP2 x DP4 (expert ZeRO-1 over 2)": (1, False, 2, "none", 1),
    "EP4": (1, False, 4, "none", 1),
    "TP2 + SP x EP2": (2, True, 2, "none", 1),
    "EP2 x DP4, full recompute": (1, False, 2, "full", 1),
    # EP folded into dp x cp (megasft.parallel_state): each CP rank dispatches its s/cp tokens.
    "CP2 x DP2, EP2 over the CP ranks": (1, False, 2, "none", 2),
    "CP2 x DP2, EP4 over CP and DP": (1, False, 4, "none", 2),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8, help="rows per global batch (bytes) / per timed step")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=2)
    add_model_args(ap, vocab=4096, hidden=256, ffn=256, layers=2, heads=8, kv_heads=4)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per backend")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def moe_config(args, rows: int):
    cfg = bench_config(args, args.seq_len, rows, 1, 2, lr=1e-4)
    m = cfg.model
    m.family, m.num_experts, m.moe_top_k = "mixtral", args.experts, args.top_k
    return cfg


def time_backends(args) -> None:
    cfg = moe_config(args, args.rows).validate()
    torch.manual_seed(args.seed)
    x = torch.randn(args.seq_len, args.rows, args.hidden, requires_grad=True)        # [s, b, h]
    layers = {}
    for backend in ("loop", "grouped_mm"):
        cfg.model.moe_experts_backend = backend
        layers[backend] = MoE(cfg.model, ParallelState.single(), False)
    with torch.no_grad():   # the same random weights in both (a router wide enough to spread tokens)
        for p in layers["loop"].parameters():
            p.normal_(0.0, 0.02 if p.ndim > 1 and p.shape[0] != args.experts else 0.5)
    layers["grouped_mm"].load_state_dict(layers["loop"].state_dict())

    def step(layer):
        def run(_):
            out, _stats = layer(x)
            out.square().mean().backward()
        return run

    times = interleaved_times({b: step(layer) for b, layer in layers.items()}, args.steps, args.warmup)
    loop, grouped = (spread(times[b]) for b in ("loop", "grouped_mm"))
    ratio = np.median(times["loop"]) / np.median(times["grouped_mm"])
    print(f"MoE layer fwd+bwd, {args.seq_len * args.rows} tokens, {args.experts} experts of width "
          f"{args.ffn}, top-{args.top_k}, hidden {args.hidden}, fp32, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}")
    print(format_table(["experts backend", "seconds per step, median [min..max]"],
                       [("loop (2 GEMMs per expert)", loop), ("grouped_mm", grouped)]))
    print(f"grouped_mm speed-up over the loop: {ratio:.2f}x")


def uniform_routing(forward):
    """The router's output with token t's j-th expert set to (t*k + j) mod E: every rank sends
    exactly the uniform share the analytic volume assumes."""
    def routed(self, x):
        logits, probs, weights, experts = forward(self, x)
        tokens, k = experts.shape
        ids = (torch.arange(tokens, device=x.device)[:, None] * k + torch.arange(k, device=x.device)) % probs.shape[-1]
        return logits, probs, weights, ids
    return routed


def measure(args, ps: ParallelState, layout) -> tuple[float, float]:
    tp, sp, ep, recompute, cp = layout
    cfg = moe_config(args, args.rows)
    cfg.parallel.tp, cfg.parallel.sequence_parallel, cfg.parallel.ep, cfg.parallel.cp = tp, sp, ep, cp
    cfg.model.recompute = recompute
    cfg.validate()
    torch.manual_seed(args.seed)
    trainer = Trainer(cfg, ps, log=False)
    rng = np.random.default_rng(args.seed)
    docs = sft_documents(lognormal_lengths(args.rows * 6, 60.0, 1.0, args.seq_len, 8, rng), args.vocab, rng)
    rows = pack_steps(docs, args.seq_len, args.rows, doc_multiple=2 * cp)[0]
    per_rank = args.rows // ps.dp
    micro = packed_micro_batches(docs, rows[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank], args.seq_len, 1,
                                 doc_multiple=2 * cp)   # the Trainer cuts each row into its CP share
    trainer.train_step(micro)
    collectives.LEDGER.start()
    trainer.train_step(micro)
    report = collectives.LEDGER.stop()
    trainer.optimizer.finish_param_sync()
    return collectives.sent_bytes(report, "ep"), predicted_bytes(pin(cfg, ps.world_size), ps.pp_rank)["ep"]


def worker(args) -> None:
    torch.set_num_threads(args.threads or 1)
    dist.init_process_group("gloo")
    table, model_forward = [], router_module.Router.forward
    for routing in ("model's router", "uniform"):
        router_module.Router.forward = model_forward if routing != "uniform" else uniform_routing(model_forward)
        for name, layout in LAYOUTS.items():
            ps = ParallelState.build(layout[0], 1, cp=layout[4], ep=layout[2])
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, measure(args, ps, layout))
            measured, planned = max(gathered)
            table.append((name, routing, f"{measured / 1e6:.3f}", f"{planned / 1e6:.3f}", f"{measured / planned:.4f}"))
    if dist.get_rank() == 0:
        print(f"\n4 ranks (gloo), Mixtral-style {args.layers} layers, {args.experts} experts, top-{args.top_k}, "
              f"h={args.hidden}, fp32, {args.rows} rows x {args.seq_len} tokens per step")
        print(format_table(["layout", "routing", "all-to-all MB/rank (max)", "planned MB", "ratio"], table))
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    time_backends(args)
    relaunch_under_torchrun("moe_dispatch.py", 4, argv)


if __name__ == "__main__":
    main()
