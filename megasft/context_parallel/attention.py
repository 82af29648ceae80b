"""Attention across the CP split: the dispatch on parallel.cp_comm."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megasft.context_parallel.allgather import allgather_attention


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int, group: dist.ProcessGroup, comm: str, backend: str,
                               window: Optional[int] = None, scale: Optional[float] = None,
                               softcap: Optional[float] = None) -> torch.Tensor:
    """This CP rank's q [s/cp, b, nq, d] against the whole rows' keys; cu_seqlens are the full rows'."""
    if comm == "allgather":
        return allgather_attention(q, k, v, cu_seqlens, group, window, scale, softcap)
    raise ValueError(f"parallel.cp_comm={comm!r} is not implemented")
