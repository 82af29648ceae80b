"""All-gather context parallelism: every CP rank gathers the whole rows' keys and values and
attends its own queries to them (Megatron-Core's "all_gather" CP communication type).

The simplest exact scheme, and the reference the ring and all-to-all schemes are checked against:
it moves (cp-1)/cp of the full K/V per layer to every rank (the ring moves the same bytes, but
block by block, overlapped) and holds the full K/V during the layer, so it suits moderate
lengths. Any window and soft-cap work, since the mask is built from the tokens' row positions:
query i sees key j iff both lie in the same segment and j <= i (and i - j < window).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megasft.context_parallel.sharding import local_token_index
from megasft.model.attention import masked_attention, segment_ids
from megasft.tensor_parallel.comm import gather_from_sp


def row_positions(cu_seqlens: torch.Tensor, b: int, cp: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's query tokens, every rank's tokens in gathered order) as flattened indices into
    the full b*s tokens: [b, s/cp] and [b, s] (rank-major within each row, as a dim-0 gather of
    [s/cp, b, ...] tensors lays them out)."""
    every = torch.stack([local_token_index(cu_seqlens, cp, r).view(b, -1) for r in range(cp)])   # [cp, b, s/cp]
    return every[rank], every.permute(1, 0, 2).reshape(b, -1)


def allgather_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                        group: dist.ProcessGroup, window: Optional[int] = None, scale: Optional[float] = None,
                        softcap: Optional[float] = None) -> torch.Tensor:
    """q [s/cp, b, nq, d], k/v [s/cp, b, nkv, d] of this CP rank -> [s/cp, b, nq, d]."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    b = q.shape[1]
    k_all, v_all = gather_from_sp(k, group), gather_from_sp(v, group)              # [s, b, nkv, d]
    q_idx, k_idx = row_positions(cu_seqlens.to(q.device), b, cp, rank)
    seg = segment_ids(cu_seqlens.to(q.device), int(k_idx.numel()))
    mask = (seg[q_idx].unsqueeze(2) == seg[k_idx].unsqueeze(1)) & (k_idx.unsqueeze(1) <= q_idx.unsqueeze(2))
    if window is not None:
        mask &= q_idx.unsqueeze(2) - k_idx.unsqueeze(1) < window
    return masked_attention(q, k_all, v_all, mask.unsqueeze(1), scale, softcap)   # mask [b, 1, s/cp, s]
