"""Causal attention over packed rows split along the sequence over a CP group — the
context-parallel counterpart of megasft.model.attention.attention, which it equals on each
rank's tokens.

  ring       ring.py       K/V passed around the ring, blockwise online softmax; no sliding window
  a2a        ulysses.py    all-to-all to head sharding, then the ordinary attention on whole rows
  allgather  allgather.py  every rank gathers the rows' whole K/V (the simple exact reference)
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megasft.context_parallel.allgather import allgather_attention
from megasft.context_parallel.block_kernel import block_kernel
from megasft.context_parallel.ring import ring_attention
from megasft.context_parallel.ulysses import ulysses_attention
from megasft.model.attention import attention

COMMS = ("ring", "a2a", "allgather")


def context_parallel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                               max_seqlen: int, group: Optional[dist.ProcessGroup], comm: str, backend: str,
                               window: Optional[int] = None, scale: Optional[float] = None,
                               softcap: Optional[float] = None) -> torch.Tensor:
    """q [s/cp, b, nq, d], k/v [s/cp, b, nkv, d]: this CP rank's tokens in its local order
    (megasft.context_parallel.sharding); `cu_seqlens` / `max_seqlen` describe the FULL rows (over
    the b*s flattened tokens, every segment a multiple of 2*cp). Returns [s/cp, b, nq, d], what
    block-causal attention over the full rows gives these tokens. `backend` is resolved
    (megasft.model.attention.resolve_backend); ring runs its own per-block kernel (block_kernel.py: the
    torch one on every backend for now, flash_attn on CUDA included)."""
    if comm not in COMMS:
        raise ValueError(f"cp_comm {comm!r} is not one of {COMMS}")
    cp = dist.get_world_size(group)
    if cp == 1:
        return attention(q, k, v, cu_seqlens, max_seqlen, backend, window, scale, softcap)
    if comm == "ring" and window is not None:
        raise ValueError(f"cp_comm=ring has no sliding window (window={window}): its blocks skip work by "
                         "the chunk structure of full causal attention; use parallel.cp_comm=a2a, which "
                         "runs the ordinary attention backend (windows included) on whole rows")
    if comm == "a2a" and q.shape[2] % cp:
        raise ValueError(f"cp_comm=a2a scatters the {q.shape[2]} local query heads over cp={cp} ranks, "
                         "which needs cp to divide them; use parallel.cp_comm=ring")
    if comm == "allgather":
        return allgather_attention(q, k, v, cu_seqlens, group, window, scale, softcap)
    if comm == "a2a":
        return ulysses_attention(q, k, v, cu_seqlens, max_seqlen, group, backend, window, scale, softcap)
    s_local, b, nq, d = q.shape
    flat = [t.transpose(0, 1).reshape(b * s_local, t.shape[2], d) for t in (q, k, v)]   # [b*s/cp, n, d]
    out = ring_attention(*flat, cu_seqlens, max_seqlen, group, block_kernel(backend, q.device),
                         d ** -0.5 if scale is None else scale, softcap)
    return out.view(b, s_local, nq, d).transpose(0, 1)
