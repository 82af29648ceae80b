"""Ulysses attention over the CP group (Jacobs et al. 2023, "DeepSpeed Ulysses"): one all-to-all
turns this rank's tokens of all its heads into every token of 1/cp of its heads, ordinary
attention runs on whole rows (any backend, sliding windows and soft-capping included), and a second
all-to-all turns the output back.

Query head chunk p (heads p*nq/cp .. (p+1)*nq/cp - 1) goes to CP rank p. Under GQA query head h
reads kv head h // rep (rep = nq / nkv), so rank p needs kv heads p*nkv/cp .. when cp divides nkv.
When it does not, each kv head is first repeated f = cp / gcd(nkv, cp) times: f divides rep (cp
divides nq = rep * nkv, and cp/gcd is coprime to nkv/gcd, so it divides rep), the repeated heads
split evenly (cp divides nkv * f) and query chunk p, now reading head h // (rep/f), reads exactly
the repeated kv chunk p.

The gathered tokens arrive rank after rank, each rank's in its local order (sharding.py); an index
built from ``sharding.local_token_index`` of every rank puts them into row order and back.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.context_parallel.sharding import local_token_index
from megasft.model.attention import attention


def kv_repeats(nkv: int, cp: int) -> int:
    """How many times each local kv head is repeated so the cp head chunks split it evenly."""
    return cp // math.gcd(nkv, cp)


class AllToAll(torch.autograd.Function):
    """x [cp, ...]: slice p goes to CP rank p; returns [cp, ...] whose slice p came from rank p.
    The operation is its own adjoint (y_r[p] = x_p[r], so dx_p[r] = dy_r[p]): the backward is the
    same all-to-all applied to the gradient."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_to_all(grad.contiguous(), ctx.group), None


def _all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    out = torch.empty_like(x)
    collectives.all_to_all_single(out, x.contiguous(), group)
    return out


def _row_order(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """perm[m] = the row-order (flattened b*s) index of the m-th gathered token. [b*s]"""
    return torch.cat([local_token_index(cu_seqlens, cp, p) for p in range(cp)])


def ulysses_attention(q, k, v, cu_seqlens, max_seqlen, group, backend: str, window: Optional[int] = None,
                      scale: Optional[float] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """q [s/cp, b, nq, d], k/v [s/cp, b, nkv, d] in this rank's local order -> [s/cp, b, nq, d]."""
    cp = dist.get_world_size(group)
    s_local, b, nq, d = q.shape
    f = kv_repeats(k.shape[2], cp)
    k, v = (t.repeat_interleave(f, dim=2) if f > 1 else t for t in (k, v))
    hq, hkv = nq // cp, k.shape[2] // cp
    tokens = b * s_local

    def chunked(t, heads):   # [s/cp, b, n, d] -> [cp, b*s/cp, n/cp, d]: head chunk p for rank p
        return t.transpose(0, 1).reshape(tokens, cp, heads, d).transpose(0, 1)

    packed = torch.cat([chunked(q, hq), chunked(k, hkv), chunked(v, hkv)], dim=2)
    gathered = AllToAll.apply(packed.contiguous(), group)          # [cp (source rank), b*s/cp, hq+2hkv, d]
    perm = _row_order(cu_seqlens, cp)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    rows = gathered.reshape(cp * tokens, -1, d)[inverse]            # [b*s, hq+2hkv, d], row order
    rows = rows.view(b, cp * s_local, -1, d).transpose(0, 1)       # [s, b, hq+2hkv, d]
    qh, kh, vh = rows.split([hq, hkv, hkv], dim=2)
    out = attention(qh, kh, vh, cu_seqlens, max_seqlen, backend, window, scale, softcap)   # [s, b, nq/cp, d]
    back = out.transpose(0, 1).reshape(cp * tokens, hq, d)[perm]    # gathered order again
    back = AllToAll.apply(back.view(cp, tokens, hq, d).contiguous(), group)   # [cp (head chunk), b*s/cp, nq/cp, d]
    return back.permute(1, 0, 2, 3).reshape(b, s_local, nq, d).transpose(0, 1)
