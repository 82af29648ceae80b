"""Keys and values of the tokens already seen, for incremental decoding (megasft.generate).

Generation runs one process at tp=pp=1 over unpacked rows (one conversation per row, every row the
same length). ``LlamaStage.forward(batch, cache=KVCache())`` then hands each attention layer the
cache: the layer appends this call's keys/values (after RoPE, so positions stay those of
``batch.position_ids``) and its queries attend over past + new keys through :func:`cached_attention`.
The first call (the prompt) fills the cache; each later call feeds only the newly sampled token.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megasft.model.attention import capped_attention


class KVCache:
    """Per attention layer: keys and values [t, b, nkv, d] of the t tokens seen so far."""

    def __init__(self) -> None:
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def length(self) -> int:
        """Tokens cached (0 before the first forward): the position of the next token."""
        return next(iter(self.layers.values()))[0].shape[0] if self.layers else 0

    def append(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add this call's k, v [s, b, nkv, d] for `layer`; returns past + new [t + s, b, nkv, d]."""
        past = self.layers.get(id(layer))
        if past is not None:
            k, v = torch.cat([past[0], k]), torch.cat([past[1], v])
        self.layers[id(layer)] = (k, v)
        return k, v


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: Optional[int] = None,
                     scale: Optional[float] = None, softcap: Optional[float] = None) -> torch.Tensor:
    """Causal attention of the s newest tokens' queries q [s, b, nq, d] over all t keys/values
    [t, b, nkv, d] (t >= s, the queries are the last s positions); with a sliding `window` a query
    sees at most the last `window` keys, itself included; `scale` and logit `softcap` as in
    megasft.model.attention (Gemma). [s, b, nq, d]"""
    s, t = q.shape[0], k.shape[0]
    query_pos = torch.arange(t - s, t, device=q.device).unsqueeze(1)      # [s, 1]
    key_pos = torch.arange(t, device=q.device).unsqueeze(0)               # [1, t]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    qh, kh, vh = (x.permute(1, 2, 0, 3) for x in (q, k, v))              # [b, heads, len, d]
    if softcap is not None:
        return capped_attention(qh, kh, vh, mask, scale, softcap).permute(2, 0, 1, 3)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, scale=scale,
                                         enable_gqa=kh.shape[1] != qh.shape[1])
    return out.permute(2, 0, 1, 3)
