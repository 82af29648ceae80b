"""Context parallelism on one long packed row: per-rank activation memory and step time at
cp = 1, 2, 4 (ring and a2a), and the CP bytes the ledger measured beside the analytic volume.

    python benchmarks/context_parallel.py [--seq-len 16384] [--hidden 128] [--layers 2]

It starts itself under torchrun (4 ranks). Every configuration runs forward + backward of the
tiny Llama (megasft.model.llama.LlamaStage, fp32) on the same row — documents of 9/16, 1/4, 1/8
and 1/16 of the row, padded to a multiple of 8 — split over the first cp ranks; the other ranks
wait. Reported per configuration (maximum over the CP ranks):

  activations  bytes autograd saved for backward (saved-tensor hooks, each storage counted once):
               the memory a step holds between forward and backward, which CP divides
  step s       median wall time of forward + backward over --repeat runs (on a shared CPU the
               ranks compete for cores, so times are indicative; the bytes are exact)
  cp bytes     bytes this rank sent over the CP group per step (megasft.collectives' ledger), and
               the analytic volume (megasft.context_parallel.volume.attention_bytes x layers,
               forward + what recompute resends (volume.recompute_bytes) + backward): the ring sends (cp-1) K/V blocks forward and (cp-1) K/V plus
               cp fp32 dK/dV blocks backward, 2 (cp-1)/cp of the layer's full K/V forward.

With --recompute selective the attention core is recomputed in backward, which removes the
[s, s]-sized scores sdpa saves at cp = 1 and leaves the activations linear in s/cp.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist

from common import format_table, relaunch_under_torchrun
from megasft import collectives
from megasft.config import ModelConfig
from megasft.context_parallel.sharding import split_micro_batch
from megasft.context_parallel.volume import attention_bytes, recompute_bytes
from megasft.data.packing import build_micro_batch
from megasft.model.llama import LlamaStage
from megasft.parallel_state import ParallelState

CONFIGS = [(1, "ring"), (2, "ring"), (2, "a2a"), (4, "ring"), (4, "a2a")]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seq-len", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--recompute", default="none", choices=["none", "selective"])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def long_row(seq: int, vocab: int):
    """One row: documents of 9/16, 1/4, 1/8 and 1/16 of it (minus a few tokens, so each is padded),
    trained after their first tenth."""
    rng = np.random.default_rng(0)
    docs = []
    for frac in (9 / 16, 1 / 4, 1 / 8, 1 / 16):
        n = int(seq * frac) - 5
        mask = np.zeros(n, np.uint8)
        mask[n // 10:] = 1
        docs.append((rng.integers(1, vocab, n), mask))
    return build_micro_batch([docs], seq, pad_id=0, doc_multiple=8)


class SavedBytes:
    """Bytes of the tensors autograd saves for backward while active (each storage once)."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        s = t.untyped_storage()
        self.storages[s.data_ptr()] = s.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def run_config(args, cp: int, comm: str, batch):
    ranks = list(range(cp))
    ps = ParallelState.build(1, 1, ranks=ranks, cp=cp)
    if ps is None:
        return None
    cfg = ModelConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
                      num_layers=args.layers, num_attention_heads=args.heads, num_kv_heads=args.kv_heads,
                      max_position_embeddings=args.seq_len, recompute=args.recompute, attention_backend="sdpa")
    torch.manual_seed(0)
    stage = LlamaStage(cfg, ps, list(range(args.layers)), True, True, cp_comm=comm).train()
    mine = split_micro_batch(batch, cp, ps.cp_rank)
    times, saved = [], SavedBytes()
    for i in range(args.repeat + 1):
        group = ps.cp_group if cp > 1 else None
        if group is not None:
            dist.barrier(group=group)
        if i == args.repeat:
            collectives.LEDGER.start()
        start = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t) if i == 0 else _null():
            loss_sum, count = stage(mine)
        loss_sum.backward()
        times.append(time.perf_counter() - start)
    report = collectives.LEDGER.stop()
    fwd, bwd = attention_bytes(comm, cp, int(mine.input_ids.numel()), args.heads, args.kv_heads,
                               args.hidden // args.heads, 4)
    sent = sum(e["bytes"] for op, e in report.get("cp", {}).items() if op != "recv")
    shapes = (comm, cp, int(mine.input_ids.numel()), args.heads, args.kv_heads, args.hidden // args.heads, 4)
    again = recompute_bytes(*shapes, args.recompute)
    return {"activations": saved.total, "step": statistics.median(times[1:]), "sent": sent,
            "analytic": args.layers * (fwd + again + bwd)}


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def worker(args) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    batch = long_row(args.seq_len, args.vocab)
    rows, base_act = [], None
    for cp, comm in CONFIGS:
        mine = run_config(args, cp, comm, batch)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        if rank == 0:
            got = [g for g in gathered if g is not None]
            act = max(g["activations"] for g in got)
            base_act = base_act or act   # cp 1 comes first
            rows.append([f"cp {cp}" + (f" {comm}" if cp > 1 else ""), f"{act / 2**20:,.1f}",
                         f"{act / base_act:.3f}", f"{max(g['step'] for g in got):.3f}",
                         f"{max(g['sent'] for g in got) / 2**20:,.2f}", f"{got[0]['analytic'] / 2**20:,.2f}",
                         f"{max(g['sent'] for g in got) / got[0]['analytic']:.4f}" if cp > 1 else "-"])
    if rank == 0:
        print(f"one row of {args.seq_len} tokens (documents of 9/16, 1/4, 1/8, 1/16 of it), hidden {args.hidden}, "
              f"{args.heads} heads / {args.kv_heads} kv, {args.layers} layers, fp32, recompute {args.recompute}")
        print(format_table(["layout", "activations MiB / rank", "vs cp 1", "fwd+bwd s", "cp MiB sent / rank",
                            "analytic MiB", "measured / analytic"], rows))
    dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if not args.worker:
        relaunch_under_torchrun("context_parallel.py", 4, argv)
    worker(args)


if __name__ == "__main__":
    main()
