"""Attention of one block of queries against one block of keys, returning the log-sum-exp the ring
merges blocks with — the per-block kernel of ring attention (megasft.context_parallel.ring).

The interface is flash-attn's varlen one, so a flash kernel (which returns the lse) can stand in
for the torch one: q [tq, nq, d] and k/v [tk, nkv, d] are flattened tokens cut into segments by
``cu_q`` / ``cu_k`` (segment i of q attends to segment i of k only); ``causal`` lets query t of a
segment see keys 0..t of the same segment, and is only used where both segments have the same
length (the diagonal block), so it is the same whether read top-left or bottom-right aligned.

  forward(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap) -> out [tq, nq, d], lse [tq, nq]
  backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, softcap) -> dq, dk, dv

``out`` and ``lse`` are fp32; in backward ``out`` and ``lse`` are the *final* (merged) output and
log-sum-exp of these queries over all blocks, so P = exp(S - lse) is this block's share of the
full softmax and the block gradients add up to the full ones (FlashAttention-2's backward, Dao 2023):

    D = rowsum(dO * O),  dV = P^T dO,  dP = dO V^T,  dS = P * (dP - D),  dQ = dS K,  dK = dS^T Q

(times the score scale, and times the cap's derivative 1 - tanh^2 when scores are soft-capped).
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch

from megasft.model.attention import segment_ids


class BlockKernel(Protocol):
    def forward(self, q, k, v, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                scale: float, softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q: int, max_k: int, causal: bool,
                 scale: float, softcap: Optional[float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...


def _block_mask(cu_q: torch.Tensor, cu_k: torch.Tensor, tq: int, tk: int, causal: bool) -> torch.Tensor:
    """True where query t may attend to key u: same segment (and u's offset <= t's if causal). [tq, tk]"""
    seg_q, seg_k = segment_ids(cu_q, tq), segment_ids(cu_k, tk)
    mask = seg_q.unsqueeze(1) == seg_k.unsqueeze(0)
    if causal:
        off_q = torch.arange(tq, device=seg_q.device) - cu_q.long()[seg_q]
        off_k = torch.arange(tk, device=seg_k.device) - cu_k.long()[seg_k]
        mask &= off_k.unsqueeze(0) <= off_q.unsqueeze(1)
    return mask


class TorchBlockKernel:
    """Dense fp32 torch math on any device: scores [nq, tq, tk] under a segment mask. Memory and
    work are O(nq * tq * tk) — over the flattened tokens of all rows of the micro-batch, so rows
    attend to each other's (masked) keys too; a reference kernel, not a fast one."""

    @staticmethod
    def _scores(q, k, scale, softcap, mask):
        """Masked scores [nq, tq, tk] fp32 and tanh of the capped ones (None without a cap)."""
        rep = q.shape[1] // k.shape[1]
        kr = k.float().repeat_interleave(rep, dim=1)                 # [tk, nq, d]: GQA groups share a kv head
        scores = torch.einsum("qnd,knd->nqk", q.float(), kr) * scale
        capped = None
        if softcap is not None:
            capped = torch.tanh(scores / softcap)
            scores = capped * softcap
        return scores.masked_fill(~mask, float("-inf")), capped

    @staticmethod
    def _probs(scores, lse):
        """exp(S - lse); a query with no visible key (lse -inf) gets all-zero probabilities."""
        finite = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
        return torch.exp(scores - finite.t().unsqueeze(-1))          # [nq, tq, tk]

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, softcap):
        mask = _block_mask(cu_q, cu_k, q.shape[0], k.shape[0], causal)
        scores, _ = self._scores(q, k, scale, softcap, mask)
        lse = torch.logsumexp(scores, dim=-1).t().contiguous()       # [tq, nq]
        p = self._probs(scores, lse)
        vr = v.float().repeat_interleave(q.shape[1] // v.shape[1], dim=1)
        return torch.einsum("nqk,knd->qnd", p, vr), lse

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, scale, softcap):
        nq, nkv = q.shape[1], k.shape[1]
        rep = nq // nkv
        mask = _block_mask(cu_q, cu_k, q.shape[0], k.shape[0], causal)
        scores, capped = self._scores(q, k, scale, softcap, mask)
        p = self._probs(scores, lse)
        do, qf = dout.float(), q.float()
        kr, vr = (t.float().repeat_interleave(rep, dim=1) for t in (k, v))
        delta = (do * out.float()).sum(-1).t().unsqueeze(-1)         # [nq, tq, 1]
        dv = torch.einsum("nqk,qnd->knd", p, do)
        ds = p * (torch.einsum("qnd,knd->nqk", do, vr) - delta)
        if capped is not None:
            ds = ds * (1 - capped * capped)                          # d(c tanh(x/c))/dx
        dq = torch.einsum("nqk,knd->qnd", ds, kr) * scale
        dk = torch.einsum("nqk,qnd->knd", ds, qf) * scale
        # Query head h used kv head h // rep: sum each group's gradients back onto its kv head.
        tk, d = k.shape[0], k.shape[2]
        return dq, dk.view(tk, nkv, rep, d).sum(2), dv.view(tk, nkv, rep, d).sum(2)


TORCH_KERNEL = TorchBlockKernel()


def block_kernel(backend: str, device: torch.device) -> BlockKernel:
    """The per-block kernel for a resolved attention `backend`. Every backend gets the torch
    kernel for now, flash_attn and torch_varlen on CUDA included: a flash varlen block kernel fits
    the interface (flash_attn_varlen_func returns the lse) but is not wired in until it can be
    tested against this one on a GPU."""
    del backend, device
    return TORCH_KERNEL
