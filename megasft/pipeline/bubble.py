"""Pipeline bubble measured across stages; the theory it is compared with is
megasft.layout.bubble_fraction (Narayanan et al. 2021, Sec. 2.2).

We report the *fraction of the step spent idle*, t_pb / (t_id + t_pb), because that is what a
stage measures directly (idle / (busy + idle)) and it stays in [0, 1).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.parallel_state import ParallelState


def pipeline_bubble(busy_s: float, wall_s: float, ps: ParallelState) -> float:
    """Bubble of the whole pipeline for one schedule run that started at the same moment on every
    stage (e.g. after a barrier): 1 - mean stage busy time / the slowest stage's wall time.
    Collective over the pipeline group."""
    if ps.pp_group is None:
        return 1.0 - busy_s / wall_s if wall_s > 0 else 0.0
    busy = torch.tensor([busy_s], dtype=torch.float64)
    wall = torch.tensor([wall_s], dtype=torch.float64)
    collectives.all_reduce(busy, ps.pp_group)
    collectives.all_reduce(wall, ps.pp_group, op=dist.ReduceOp.MAX)
    return 1.0 - float(busy) / ps.pp / float(wall)
