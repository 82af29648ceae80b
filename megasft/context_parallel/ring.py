"""Ring attention over the CP group: K/V blocks travel around the ring while each rank attends its
own queries to the block it holds, merging blocks by their log-sum-exp (Liu et al. 2023, "Ring
Attention with Blockwise Transformers"; the backward follows zhuzilin/ring-flash-attn: dK/dV
accumulators travel with the K/V blocks and come home after the last hop).

Rank r sends to r+1 and receives from r-1, so at step i it holds the block of rank j = (r-i) mod cp.
With the sharding of megasft.context_parallel.sharding (rank r holds chunks r and 2cp-1-r of every
segment, in that order) the block structure is known per segment without looking at positions:

  j == r  chunk r then chunk 2cp-1-r against themselves: block-causal over ``cu_seqlens // cp``
  j <  r  j's chunk j precedes both of r's chunks, j's chunk 2cp-1-j follows both (2cp-1-j >
          2cp-1-r > r): every local query sees exactly the FIRST half of each of j's segments
  j >  r  r's chunk r precedes both of j's chunks (r < j < 2cp-1-j); r's chunk 2cp-1-r follows both
          (2cp-1-r > 2cp-1-j and >= cp > j): only the SECOND half of the local queries sees, and
          sees all of j's segment

so each off-diagonal block is a non-causal half-block and every rank does the same work per step
(besides the diagonal one): the point of the 2cp-chunk sharding.

Communication overlaps compute: the next block's isend/irecv is posted before the current block is
computed and waited on after it. Both K and V travel as one [2, t, nkv, d] message; the dK/dV
accumulators are fp32 (a sum over cp blocks) and travel the same way in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.context_parallel.block_kernel import BlockKernel
from megasft.context_parallel.sharding import local_cu_seqlens
from megasft.model.attention import segment_ids

KV_TAG, DKV_TAG = 31, 32    # distinct tags: at cp=2 the K/V and dK/dV messages share a peer


@dataclass
class RingPlan:
    """Where this rank sits in the ring and the half-segment views of its local tokens."""

    group: Optional[dist.ProcessGroup]
    rank: int                      # index in the CP group
    size: int
    next_rank: int                 # global ranks of the ring neighbours
    prev_rank: int
    cu_local: torch.Tensor         # segment boundaries over the local tokens (each segment 1/cp)
    cu_half: torch.Tensor          # the same over one half (one chunk) of each local segment
    max_local: int
    max_half: int
    first: torch.Tensor            # local token indices of each segment's first half (chunk r)
    second: torch.Tensor           # ... and of its second half (chunk 2cp-1-r)

    @classmethod
    def build(cls, cu_seqlens: torch.Tensor, max_seqlen: int, group, local_tokens: int) -> "RingPlan":
        ranks = dist.get_process_group_ranks(group)
        rank, size = dist.get_rank(group), len(ranks)
        cu_local = local_cu_seqlens(cu_seqlens, size)
        seg = segment_ids(cu_local, local_tokens)
        cu = cu_local.long()
        offset = torch.arange(local_tokens, device=cu.device) - cu[seg]
        in_first = offset < (cu[1:] - cu[:-1])[seg] // 2
        return cls(group, rank, size, ranks[(rank + 1) % size], ranks[(rank - 1) % size], cu_local,
                   torch.div(cu_seqlens, 2 * size, rounding_mode="floor"), max_seqlen // size,
                   max_seqlen // (2 * size), torch.nonzero(in_first).flatten(), torch.nonzero(~in_first).flatten())

    def block(self, owner: int):
        """(query rows, key rows, cu_q, cu_k, max_q, max_k, causal) for the block of rank `owner`;
        rows None mean all local tokens."""
        full, half = (self.cu_local, self.max_local), (self.cu_half, self.max_half)
        if owner == self.rank:
            return None, None, full[0], full[0], full[1], full[1], True
        if owner < self.rank:
            return None, self.first, full[0], half[0], full[1], half[1], False
        return self.second, None, half[0], full[0], half[1], full[1], False

    def owner(self, step: int) -> int:
        return (self.rank - step) % self.size

    def exchange(self, send: torch.Tensor, tag: int):
        """Post sending `send` to the next rank and receiving its like from the previous one."""
        recv = torch.empty_like(send)
        work = collectives.start_p2p([("send", send, self.next_rank, tag), ("recv", recv, self.prev_rank, tag)],
                                     self.group)
        return recv, work


def _rows(t: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return t if rows is None else t.index_select(0, rows)


def _merge(out, lse, rows, blk_out, blk_lse) -> None:
    """Fold a block's (out, lse) into the running fp32 accumulators for `rows`, in place:
    lse' = log(e^lse + e^blk), out' = e^(lse-lse') out + e^(blk-lse') blk_out."""
    o, l = _rows(out, rows), _rows(lse, rows)
    new = torch.logaddexp(l, blk_lse)
    o = o * torch.exp(l - new).unsqueeze(-1) + blk_out * torch.exp(blk_lse - new).unsqueeze(-1)
    if rows is None:
        out.copy_(o), lse.copy_(new)
    else:
        out.index_copy_(0, rows, o), lse.index_copy_(0, rows, new)


def _add_rows(acc: torch.Tensor, rows: Optional[torch.Tensor], x: torch.Tensor) -> None:
    if rows is None:
        acc.add_(x)
    else:
        acc.index_add_(0, rows, x)


class RingAttention(torch.autograd.Function):
    """q [t, nq, d], k/v [t, nkv, d]: this rank's flattened local tokens -> out [t, nq, d].
    Saves only q, k, v, out and lse; the backward sends K/V around the ring again."""

    @staticmethod
    def forward(ctx, q, k, v, plan: RingPlan, kernel: BlockKernel, scale: float, softcap: Optional[float]):
        kv = torch.stack([k, v])                                    # [2, t, nkv, d]: one message per hop
        out = lse = None
        for step in range(plan.size):
            if step + 1 < plan.size:
                incoming, work = plan.exchange(kv, KV_TAG)          # posted before this block's compute
            q_rows, k_rows, cu_q, cu_k, max_q, max_k, causal = plan.block(plan.owner(step))
            blk_out, blk_lse = kernel.forward(_rows(q, q_rows), _rows(kv[0], k_rows), _rows(kv[1], k_rows),
                                              cu_q, cu_k, max_q, max_k, causal, scale, softcap)
            if step == 0:   # the diagonal block: every query sees itself, so lse is finite from here on
                out, lse = blk_out, blk_lse
            else:
                _merge(out, lse, q_rows, blk_out, blk_lse)
            if step + 1 < plan.size:
                work.wait()
                kv = incoming
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.kernel, ctx.scale, ctx.softcap = plan, kernel, scale, softcap
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        plan, kernel = ctx.plan, ctx.kernel
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = torch.stack([k, v])
        dkv = dkv_work = None
        for step in range(plan.size):
            if step + 1 < plan.size:
                incoming, kv_work = plan.exchange(kv, KV_TAG)
            q_rows, k_rows, cu_q, cu_k, max_q, max_k, causal = plan.block(plan.owner(step))
            blk_dq, blk_dk, blk_dv = kernel.backward(
                _rows(dout, q_rows), _rows(q, q_rows), _rows(kv[0], k_rows), _rows(kv[1], k_rows),
                _rows(out, q_rows), _rows(lse, q_rows), cu_q, cu_k, max_q, max_k, causal, ctx.scale, ctx.softcap)
            _add_rows(dq, q_rows, blk_dq)
            if step == 0:   # the accumulator of this rank's own block starts here
                dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            else:           # the accumulator that travelled with the block we hold
                dkv_work.wait()
            _add_rows(dkv[0], k_rows, blk_dk)
            _add_rows(dkv[1], k_rows, blk_dv)
            dkv, dkv_work = plan.exchange(dkv, DKV_TAG)             # on with its block; the last hop brings ours home
            if step + 1 < plan.size:
                kv_work.wait()
                kv = incoming
        dkv_work.wait()
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None


def ring_attention(q, k, v, cu_seqlens, max_seqlen, group, kernel: BlockKernel, scale: float,
                   softcap: Optional[float]) -> torch.Tensor:
    """Flattened local tokens q [t, nq, d], k/v [t, nkv, d] -> out [t, nq, d] (see the module doc)."""
    plan = RingPlan.build(cu_seqlens, max_seqlen, group, q.shape[0])
    return RingAttention.apply(q, k, v, plan, kernel, scale, softcap)
