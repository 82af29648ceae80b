"""Communication volume per step, measured by the ledger (megasft.collectives) vs the planner's
analytic prediction (megasft.planner.comm.predicted_bytes), per group kind, for several layouts
of one 8-rank world (gloo, one process per rank).

    python benchmarks/comm_volume.py [--seq-len 256] [--hidden 256] [--layers 4]

It starts itself under torchrun (8 ranks on this machine). Every layout trains one warm-up step,
then one counted step on packed long-tailed documents; rank 0 gathers each rank's report and
prints, per layout and kind, the largest measured bytes per rank, the planner's bytes for that
rank, their ratio, and the seconds the rank was blocked in those calls (on a CPU machine gloo
shares the cores with compute, so the seconds say little; the bytes are exact).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.distributed as dist

from common import (add_model_args, bench_config, format_table, lognormal_lengths, pack_steps,
                    packed_micro_batches, relaunch_under_torchrun, sft_documents)
from megasft import collectives
from megasft.parallel_state import ParallelState
from megasft.planner.comm import predicted_bytes
from megasft.planner.pinned import pin
from megasft.training.loop import Trainer

# name: (tp, pp, virtual, sequence parallel, ZeRO-1, overlap, tied embeddings, cp, cp_comm)
LAYOUTS = {
    "TP2 x PP2 x DP2, ZeRO-1": (2, 2, 1, False, True, False, False, 1, "ring"),
    "TP2 x PP2 x DP2, SP, interleaved v2": (2, 2, 2, True, True, False, False, 1, "ring"),
    "TP2 x DP4, ZeRO-1 + overlap, SP": (2, 1, 1, True, True, True, False, 1, "ring"),
    "TP8": (8, 1, 1, False, True, False, False, 1, "ring"),
    "PP2 x DP4, tied, plain DP": (1, 2, 1, False, False, False, True, 1, "ring"),
    "TP2 x CP2 (ring) x DP2, SP, ZeRO-1": (2, 1, 1, True, True, False, False, 2, "ring"),
    "CP4 (a2a) x PP2, ZeRO-1": (1, 2, 1, False, True, False, False, 4, "a2a"),
}
KINDS = ("tp", "cp", "pp", "dp", "embedding")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--rows", type=int, default=8, help="rows per global batch")
    add_model_args(ap, vocab=4096, hidden=256, ffn=688, layers=4, heads=8, kv_heads=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def measure(args, ps: ParallelState, layout) -> dict:
    tp, pp, virtual, sp, zero1, overlap, tied, cp, cp_comm = layout
    cfg = bench_config(args, args.seq_len, args.rows, 1, 2, lr=1e-4)
    p = cfg.parallel
    p.tp, p.pp, p.virtual_pipeline_size, p.sequence_parallel = tp, pp, virtual, sp
    p.cp, p.cp_comm = cp, cp_comm
    p.distributed_optimizer, p.overlap_grad_reduce, p.overlap_param_gather = zero1, overlap, overlap
    p.dp, cfg.model.tie_embeddings = None, tied
    cfg.validate()
    torch.manual_seed(args.seed)
    trainer = Trainer(cfg, ps, log=False)
    rng = np.random.default_rng(args.seed)
    docs = sft_documents(lognormal_lengths(args.rows * 6, 60.0, 1.0, args.seq_len, 8, rng), args.vocab, rng)
    multiple = 2 * cp if cp > 1 else 1                   # the loader's CP padding
    rows = pack_steps(docs, args.seq_len, args.rows, multiple)[0]
    per_rank = args.rows // ps.dp
    mine = rows[ps.dp_rank * per_rank:(ps.dp_rank + 1) * per_rank]
    micro = packed_micro_batches(docs, mine, args.seq_len, 1, doc_multiple=multiple)
    trainer.train_step(micro)
    collectives.LEDGER.start()
    trainer.train_step(micro)
    report = collectives.LEDGER.stop()
    trainer.optimizer.finish_param_sync()
    planned = predicted_bytes(pin(cfg, ps.world_size), ps.pp_rank)
    return {kind: (collectives.sent_bytes(report, kind), planned[kind],
                   sum(e["seconds"] for e in report.get(kind, {}).values())) for kind in KINDS}


def worker(args) -> None:
    torch.set_num_threads(args.threads or 1)
    dist.init_process_group("gloo")
    rows = []
    for name, layout in LAYOUTS.items():
        ps = ParallelState.build(layout[0], layout[1], cp=layout[7])
        mine = measure(args, ps, layout)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        for kind in KINDS:
            worst = max(gathered, key=lambda r: r[kind][0])[kind]
            measured, planned, seconds = worst
            if measured or planned:
                ratio = f"{measured / planned:.4f}" if planned else "-"
                rows.append((name, kind, f"{measured / 1e6:.3f}", f"{planned / 1e6:.3f}", ratio, f"{seconds:.3f}"))
    if dist.get_rank() == 0:
        print(f"8 ranks (gloo), tiny Llama h={args.hidden} L={args.layers} V={args.vocab}, fp32, "
              f"{args.rows} rows x {args.seq_len} tokens per step, torch {torch.__version__}")
        print(format_table(["layout", "kind", "measured MB/rank", "planned MB", "ratio", "blocked s"], rows))
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    relaunch_under_torchrun("comm_volume.py", 8, argv)


if __name__ == "__main__":
    main()
