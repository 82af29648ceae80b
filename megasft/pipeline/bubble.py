"""Pipeline bubble: theory (Narayanan et al. 2021, Sec. 2.2) and measurement across stages.

With p stages, m micro-batches and per-micro-batch stage times t_f (forward) and t_b (backward),
1F1B idles every stage for t_pb = (p - 1)(t_f + t_b) per step while the ideal step takes
t_id = m (t_f + t_b). The paper quotes the ratio t_pb / t_id = (p - 1) / m; we report the
*fraction of the step spent idle*, t_pb / (t_id + t_pb), because that is what a stage measures
directly (idle / (busy + idle)) and it stays in [0, 1):

    1F1B:         (p - 1) / (m + p - 1)
    interleaved:  (p - 1) / (v m + p - 1)     (v chunks per rank: t_pb shrinks to t_pb / v,
                                                Sec. 2.2.2, while t_id is unchanged)

Both assume equal stage costs and free communication.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasft.parallel_state import ParallelState


def bubble_1f1b(p: int, m: int) -> float:
    return (p - 1) / (m + p - 1)


def bubble_interleaved(p: int, m: int, v: int) -> float:
    return (p - 1) / (v * m + p - 1)


def pipeline_bubble(busy_s: float, wall_s: float, ps: ParallelState) -> float:
    """Bubble of the whole pipeline for one schedule run that started at the same moment on every
    stage (e.g. after a barrier): 1 - mean stage busy time / the slowest stage's wall time.
    Collective over the pipeline group."""
    if ps.pp_group is None:
        return 1.0 - busy_s / wall_s if wall_s > 0 else 0.0
    busy = torch.tensor([busy_s], dtype=torch.float64)
    wall = torch.tensor([wall_s], dtype=torch.float64)
    dist.all_reduce(busy, group=ps.pp_group)
    dist.all_reduce(wall, op=dist.ReduceOp.MAX, group=ps.pp_group)
    return 1.0 - float(busy) / ps.pp / float(wall)
