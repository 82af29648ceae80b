"""Plan a layout on a cluster: per-rank memory, bubble, FLOPs, communication, step time and MFU.

Examples:
    python tools/plan.py --config examples/configs/llama3.1_405b.yaml --nodes 128 --gpus-per-node 8 --gpu h100-80gb
    python tools/plan.py --config examples/configs/llama3.1_70b.yaml --nodes 8 --gpu h100-80gb parallel.pp=2
    python tools/plan.py --config examples/configs/llama3.1_8b.yaml --nodes 1 --gpu h100-80gb --search --top 10

Exit status: 0 when the layout fits, 1 when it does not (the nearest layouts that fit are listed)
or the config is invalid for the cluster.
"""
from __future__ import annotations

import argparse
import sys

from megasft.config import Config, ConfigError
from megasft.planner import (GPUS, Assumptions, PlanError, check_fits, make_cluster, nearest_fitting,
                             plan, search)
from megasft.planner.report import format_overrides, format_plan, format_search


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="YAML config (examples/configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS))
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="override the GPU's usable memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="override dense bf16 peak TFLOP/s")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="override NVLink bus bandwidth (GB/s)")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="override network bandwidth per GPU (GB/s)")
    p.add_argument("--search", action="store_true", help="rank every layout that fits by estimated tokens/s")
    p.add_argument("--top", type=int, default=15, help="layouts shown by --search and refusals")
    defaults = Assumptions()
    p.add_argument("--loss-chunk-tokens", type=int, default=None, help="plan a token-chunked cross-entropy")
    p.add_argument("--matmul-efficiency", type=float, default=defaults.matmul_efficiency)
    p.add_argument("--attention-efficiency", type=float, default=defaults.attention_efficiency)
    p.add_argument("--reserved-gib", type=float, default=defaults.reserved_gib,
                   help="memory outside PyTorch tensors (CUDA context, NCCL)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = Config.load(args.config, args.overrides)
        cluster = make_cluster(args.nodes, args.gpus_per_node, args.gpu, memory_gib=args.gpu_memory_gib,
                               peak_tflops=args.peak_tflops, intra_node_gbps=args.intra_node_gbps,
                               inter_node_gbps=args.inter_node_gbps)
        assumptions = Assumptions(matmul_efficiency=args.matmul_efficiency,
                                  attention_efficiency=args.attention_efficiency,
                                  loss_chunk_tokens=args.loss_chunk_tokens, reserved_gib=args.reserved_gib)
        if args.search:
            ranked = search(cfg, cluster, assumptions, top=args.top)
            print(format_search(ranked) if ranked else "no layout fits this cluster")
            return 0 if ranked else 1
        result = plan(cfg, cluster, assumptions)
        print(format_plan(result))
        check_fits(result)
    except PlanError as err:
        print(f"\nrefused: {err}", file=sys.stderr)
        nearest = nearest_fitting(cfg, cluster, assumptions, count=min(args.top, 5))
        if nearest:
            print("\nnearest layouts that fit:", file=sys.stderr)
            print(format_search(nearest), file=sys.stderr)
            print(f"\napply #1 with: {format_overrides(nearest[0])}", file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
