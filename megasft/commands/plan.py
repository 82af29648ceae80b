"""Plan a layout on a cluster: per-rank memory, bubble, FLOPs, communication, step time and MFU.

Examples:
    megasft plan --config examples/configs/llama3.1_405b.yaml --nodes 128 --gpus-per-node 8 --gpu h100-80gb
    megasft plan --config examples/configs/llama3.1_70b.yaml --nodes 8 --gpu h100-80gb parallel.pp=2
    megasft plan --config examples/configs/llama3.1_8b.yaml --nodes 1 --gpu h100-80gb --search --top 10

Exit status: 0 when the layout fits, 1 when it does not (the nearest layouts that fit are listed;
when none does, the memory it is short by and the nodes it would need) or the config is invalid
for the cluster.
"""
from __future__ import annotations

import argparse
import sys

from megasft.commands import HelpFormatter
from megasft.config import Config, ConfigError
from megasft.planner import (GPUS, Assumptions, PlanError, check_fits, make_cluster, nearest_fitting,
                             plan, search)
from megasft.planner.hardware import GIB
from megasft.planner.report import format_overrides, format_plan, format_search
from megasft.planner.search import candidate_of, nodes_needed, smallest_memory


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="megasft plan", description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", required=True, help="YAML config (examples/configs/...)")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides, as for training")
    p.add_argument("--nodes", type=int, required=True, help="nodes in the cluster")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (ranks) per node")
    p.add_argument("--gpu", default="h100-80gb", choices=sorted(GPUS), help="GPU type")
    p.add_argument("--gpu-memory-gib", type=float, default=None, help="override the GPU's usable memory")
    p.add_argument("--peak-tflops", type=float, default=None, help="override dense bf16 peak TFLOP/s")
    p.add_argument("--intra-node-gbps", type=float, default=None, help="override NVLink bus bandwidth (GB/s)")
    p.add_argument("--inter-node-gbps", type=float, default=None, help="override network bandwidth per GPU (GB/s)")
    p.add_argument("--search", action="store_true", help="rank every layout that fits by estimated tokens/s")
    p.add_argument("--top", type=int, default=15, help="layouts shown by --search and refusals")
    defaults = Assumptions()
    p.add_argument("--loss-chunk-tokens", type=int, default=None, help="plan a token-chunked cross-entropy")
    p.add_argument("--matmul-efficiency", type=float, default=defaults.matmul_efficiency,
                   help="achieved fraction of peak in GEMMs")
    p.add_argument("--attention-efficiency", type=float, default=defaults.attention_efficiency,
                   help="achieved fraction of peak in attention")
    p.add_argument("--reserved-gib", type=float, default=defaults.reserved_gib,
                   help="memory outside PyTorch tensors (CUDA context, NCCL)")
    return p.parse_args(argv)


def nothing_fits(cfg, cluster, assumptions) -> str:
    """Why no layout fits and what would: the memory the leanest layout is short by, the nodes needed."""
    gpu = cluster.gpu
    lines = [f"no layout fits {cluster.nodes} nodes x {cluster.gpus_per_node} {gpu.name} "
             f"({gpu.memory_gib:.1f} GiB each)"]
    lean = smallest_memory(cfg, cluster, assumptions)
    if lean is None:
        lines.append(f"  no valid layout at all for {cluster.world_size} GPUs (the global batch of "
                     f"{cfg.data.rows_per_step()} rows must split over data-parallel ranks)")
    else:
        short = (lean.worst.total - cluster.memory_bytes) / GIB
        lines.append(f"  leanest layout {candidate_of(lean.config).describe()} needs {lean.worst.total / GIB:.1f} "
                     f"GiB per GPU: short by {short:.1f} GiB")
    nodes = nodes_needed(cfg, cluster, assumptions)
    if nodes is not None:
        lines.append(f"  {nodes} nodes of {cluster.gpus_per_node} {gpu.name} would fit: "
                     f"megasft plan ... --nodes {nodes} --search")
    else:
        lines.append("  no node count up to 1024 fits: lower data.seq_len or data.global_batch_tokens, "
                     "or pick a GPU with more memory (--gpu)")
    return "\n".join(lines)


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
            print(format_search(ranked) if ranked else nothing_fits(cfg, cluster, assumptions))
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
        else:
            print("\n" + nothing_fits(cfg, cluster, assumptions), file=sys.stderr)
        return 1
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
