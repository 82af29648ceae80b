"""Block-diagonal causal attention over packed rows, behind one function with several backends.

All backends take the same inputs: q [s, b, nq, d], k and v [s, b, nkv, d] (grouped-query when
nkv < nq) and ``cu_seqlens`` — int32 segment boundaries over the b*s tokens flattened row-major —
and return [s, b, nq, d]. A token attends to earlier tokens of its own segment only, so every
document of a packed row sees exactly what it would see alone. With a sliding ``window`` W it sees
at most the last W tokens of its segment, itself included (key j > query i - W, as transformers'
sliding_window_overlay); every backend applies it inside the segment, so packing changes nothing.
``scale`` replaces 1/sqrt(d) (Gemma's query_pre_attn_scalar**-0.5); ``softcap`` c caps the scaled
scores as c * tanh(scores / c) before the mask and softmax (Gemma 2), as transformers' eager
attention does. SDPA has no soft-capping, so the sdpa backend computes capped attention
explicitly in torch (scores [b, heads, s, s], softmax in fp32); torch_varlen has none either:
resolve_backend refuses that combination by name and 'auto' passes over it.

  sdpa          pure torch, any device: scaled_dot_product_attention with a block-diagonal causal mask
  torch_varlen  torch.nn.attention.varlen.varlen_attn (CUDA)
  flash_attn    flash_attn.flash_attn_varlen_func (CUDA, optional package)
  auto          flash_attn if importable on CUDA, else torch_varlen on CUDA (not with softcap), else sdpa
"""
from __future__ import annotations

import functools
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F

BACKENDS = ("auto", "sdpa", "torch_varlen", "flash_attn")


@functools.lru_cache(maxsize=None)
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


@functools.lru_cache(maxsize=None)
def _has_torch_varlen() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device, softcap: Optional[float] = None) -> str:
    """Turn 'auto' into a concrete backend and refuse ones that cannot run here (or cannot
    soft-cap the attention logits when `softcap` is set)."""
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is not one of {BACKENDS}")
    cuda = device.type == "cuda"
    if name == "auto":
        if cuda and _has_flash_attn():
            return "flash_attn"
        return "torch_varlen" if cuda and _has_torch_varlen() and softcap is None else "sdpa"
    if name == "flash_attn" and not (cuda and _has_flash_attn()):
        raise ValueError("attention_backend=flash_attn needs CUDA and the flash-attn package "
                         "(pip install -e '.[gpu]'); use 'auto' or 'sdpa'")
    if name == "torch_varlen" and softcap is not None:
        raise ValueError(f"attention_backend=torch_varlen has no logit soft-capping (model.attn_logit_softcapping="
                         f"{softcap}); use attention_backend=flash_attn, sdpa or auto")
    if name == "torch_varlen" and not (cuda and _has_torch_varlen()):
        raise ValueError("attention_backend=torch_varlen needs CUDA and torch>=2.9; use 'auto' or 'sdpa'")
    return name


def segment_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Segment index of each of the `total` flattened tokens. [total]"""
    positions = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)


def block_causal_mask(cu_seqlens: torch.Tensor, b: int, s: int, window: Optional[int] = None) -> torch.Tensor:
    """Boolean mask [b, 1, s, s]: True where query i may attend to key j (same segment, j <= i,
    and i - j < window when a window is given)."""
    seg = segment_ids(cu_seqlens, b * s).view(b, s)
    same = seg.unsqueeze(2) == seg.unsqueeze(1)                      # [b, s, s]
    causal = torch.ones(s, s, dtype=torch.bool, device=seg.device).tril_()
    if window is not None:
        causal = causal.triu_(-(window - 1))                        # keep i - window < j <= i
    return (same & causal).unsqueeze(1)


def _sdpa(q, k, v, cu_seqlens, max_seqlen, window, scale, softcap):
    s, b = q.shape[:2]
    return masked_attention(q, k, v, block_causal_mask(cu_seqlens, b, s, window), scale, softcap)


def masked_attention(q, k, v, mask, scale, softcap):
    """q [sq, b, nq, d], k/v [sk, b, nkv, d] under a boolean mask [b, 1, sq, sk] -> [sq, b, nq, d]."""
    qh, kh, vh = (t.permute(1, 2, 0, 3) for t in (q, k, v))         # [b, heads, s, d]
    if softcap is None:
        out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                             enable_gqa=kh.shape[1] != qh.shape[1])
    else:
        out = capped_attention(qh, kh, vh, mask, scale, softcap)
    return out.permute(2, 0, 1, 3)                                  # [s, b, nq, d]


def capped_attention(q, k, v, mask, scale, softcap):
    """Soft-capped softmax attention on [b, heads, s, d], the order of transformers' eager path:
    scale, cap, mask, softmax in fp32 cast back, times V. Masked scores are -inf (every query
    sees itself, so no row is empty)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    scores = torch.tanh(scores / softcap) * softcap                 # [b, nq, s, s]
    scores = scores.masked_fill(~mask, float("-inf"))
    return F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def _flatten(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).reshape(-1, *t.shape[2:])              # [s, b, n, d] -> [b*s, n, d]


def _varlen(q, k, v, cu_seqlens, max_seqlen, backend, window, scale, softcap):
    s, b = q.shape[:2]
    qf, kf, vf = _flatten(q), _flatten(k), _flatten(v)
    cu = cu_seqlens.to(torch.int32)
    # (left, right) keys beside the query, per segment; (W - 1, 0) is a causal window of W tokens.
    left = -1 if window is None else window - 1
    if backend == "flash_attn":
        from flash_attn import flash_attn_varlen_func

        out = flash_attn_varlen_func(qf, kf, vf, cu, cu, max_seqlen, max_seqlen, causal=True,
                                     window_size=(left, 0), softmax_scale=scale,
                                     softcap=0.0 if softcap is None else softcap)
    else:
        from torch.nn.attention.varlen import varlen_attn

        out = varlen_attn(qf, kf, vf, cu, cu, max_seqlen, max_seqlen, window_size=(left, 0), scale=scale,
                          enable_gqa=kf.shape[1] != qf.shape[1])
    return out.view(b, s, *out.shape[1:]).transpose(0, 1)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
              max_seqlen: int, backend: str, window: Optional[int] = None, scale: Optional[float] = None,
              softcap: Optional[float] = None) -> torch.Tensor:
    """Block-diagonal causal attention, optionally within a sliding `window` of tokens, with score
    `scale` (default 1/sqrt(d)) and logit `softcap`; `backend` must already be resolved (see
    resolve_backend)."""
    if backend == "sdpa":
        return _sdpa(q, k, v, cu_seqlens, max_seqlen, window, scale, softcap)
    return _varlen(q, k, v, cu_seqlens, max_seqlen, backend, window, scale, softcap)
