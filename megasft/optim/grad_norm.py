"""Global gradient norm across TP, PP and DP, counting every distinct parameter once, and clipping.

A parameter may be held by several ranks of a TP group (norm weights: all tp of them; kv heads
replicated when tp > num_kv_heads: tp // kv_heads), and a tied embedding by both the first and the
last pipeline stage: its ParamSpec says so (``tp_copies``, ``pp_copies``; megasft.tensor_parallel.spec).
Each copy contributes ||g||² / copies to the local sum, so summing over the TP group and the PP
group counts it exactly once:

    ||g||² = Σ_groups Σ_local ||g_p||² / copies(p)

Under ZeRO-1 every DP rank holds a disjoint shard of the reduced gradient, so the DP group is summed
over too; without sharding every DP rank holds the whole (identical) gradient and must not be.
Routed experts under expert parallelism are different tensors on each rank of the EP group and
alike over the expert-DP group: their squared sum is reduced over EP always and over expert-DP
under ZeRO-1, then added to the dense parameters' before the TP and PP sums.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megasft import collectives


def weighted_sq_sum(pieces: Iterable[tuple[torch.Tensor, int]], device: torch.device) -> torch.Tensor:
    """Σ ||g||² / copies over (gradient piece, copies) pairs, as an fp32 scalar tensor."""
    total = torch.zeros((), dtype=torch.float32, device=device)
    for grad, n in pieces:
        # vector_norm reduces without materialising g² (the shard can be billions of elements).
        total += torch.linalg.vector_norm(grad, dtype=torch.float32).square() / n
    return total


def summed(local_sq_sum: torch.Tensor, groups: Iterable[Optional[dist.ProcessGroup]]) -> torch.Tensor:
    """The local squared sum all-reduced (SUM) over each group; None groups are size 1."""
    total = local_sq_sum.detach().clone().float()
    for group in groups:
        collectives.all_reduce(total, group)
    return total


def global_norm(local_sq_sum: torch.Tensor, groups: Iterable[Optional[dist.ProcessGroup]]) -> float:
    """sqrt of the local squared sum all-reduced (SUM) over each group; None groups are size 1."""
    return float(summed(local_sq_sum, groups).sqrt())  # inf or nan when some gradient was not finite


def clip_coefficient(norm: float, max_norm: float) -> float:
    """The factor the gradients are multiplied by, as torch.nn.utils.clip_grad_norm_ computes it:
    min(1, max_norm / (norm + 1e-6)); max_norm <= 0 disables clipping."""
    if max_norm <= 0:
        return 1.0
    return min(1.0, max_norm / (norm + 1e-6))
