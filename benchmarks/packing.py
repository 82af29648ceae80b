"""Packing efficiency (real tokens / token slots) of best-fit-decreasing vs naive padding and greedy
concatenation, on long-tailed log-normal document lengths (median ~300 tokens, tail clipped at seq_len).

    python benchmarks/packing.py [--docs 50000] [--seed 0]

Baselines, measured in the same run on the same lengths:
- naive padding: one document per row, padded to seq_len;
- greedy concatenation: documents in order, a new row whenever the next one does not fit (whole
  documents, as packing must keep them).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from megasft.data.packing import pack_best_fit, packing_efficiency


def pack_greedy(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    rows, fill = [[]], 0
    for d, n in enumerate(lengths.tolist()):
        if fill + n > seq_len:
            rows.append([])
            fill = 0
        rows[-1].append(d)
        fill += n
    return rows


def pack_naive(lengths: np.ndarray, seq_len: int) -> list[list[int]]:
    return [[d] for d in range(len(lengths))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=50000)
    parser.add_argument("--median", type=float, default=300.0)
    parser.add_argument("--sigma", type=float, default=1.0, help="log-normal shape (1.0: ~3%% of docs > 2048)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    raw = np.maximum(1, rng.lognormal(np.log(args.median), args.sigma, args.docs).astype(np.int64))
    print(f"{args.docs} documents, log-normal median {np.median(raw):.0f}, p99 {np.percentile(raw, 99):.0f}, "
          f"max {raw.max()} (clipped to seq_len)")
    print(f"{'seq_len':>7} | {'method':<22} | {'rows':>7} | {'efficiency':>10} | {'time s':>7}")
    ratios = []
    for seq_len in (2048, 4096):
        lengths = np.minimum(raw, seq_len)
        results = {}
        for name, fn in (("naive padding", pack_naive), ("greedy concatenation", pack_greedy),
                         ("best-fit-decreasing", pack_best_fit)):
            start = time.perf_counter()
            rows = fn(lengths, seq_len)
            seconds = time.perf_counter() - start
            assert sorted(d for r in rows for d in r) == list(range(len(lengths)))
            results[name] = packing_efficiency(lengths, rows, seq_len)
            print(f"{seq_len:>7} | {name:<22} | {len(rows):>7} | {100 * results[name]:>9.2f}% | {seconds:>7.2f}")
        ratios.append((seq_len, results["best-fit-decreasing"], results["greedy concatenation"], results["naive padding"]))
    for seq_len, bfd, greedy, naive in ratios:
        print(f"seq_len {seq_len}: best-fit-decreasing {100 * bfd:.2f}% (target >= 98%) = "
              f"{bfd / greedy:.2f}x greedy concatenation, {bfd / naive:.2f}x naive padding")


if __name__ == "__main__":
    main()
