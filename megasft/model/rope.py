"""Rotary position embeddings (Su et al. 2021): inverse frequencies and per-token cos/sin.

Frequency scalings, each equal to transformers' (modeling_rope_utils):

* none / ``default``: inv_freq_i = theta^(-2i/r);
* ``llama3`` (Llama-3.1): low frequencies divided by ``factor``, high ones kept, interpolated between;
* ``linear`` (position interpolation; Gemma 3's global layers): every frequency divided by ``factor``;
* ``longrope`` (``su`` is its old name; Phi-3 128k, Phi-4-mini): inv_freq_i / ext_i with ext =
  ``short_factor`` or ``long_factor``, and cos/sin both multiplied by an attention factor
  (``attention_factor``, else sqrt(1 + ln(f) / ln(L0)), f = ``factor`` or max_position_embeddings / L0,
  L0 = original_max_position_embeddings; 1 when f <= 1).

Which longrope factor: transformers picks ``long_factor`` when max(position_ids) + 1 > L0 over the
whole forward, i.e. a sequence run alone gets the long factor iff it is longer than L0. megasft
decides **per document** of a packed row (its length > L0), so every document gets the rotary
embedding it gets alone in transformers, and packing never changes a document's math.

``partial_rotary_factor`` (Phi-4-mini: 0.75) rotates only the first r = int(head_dim * factor)
dims of each head; the rest pass through (transformers' apply_rotary_pos_emb).

Gemma 3's sliding-window layers use their own base, ``rope_local_theta``, never scaled
(``Rope(cfg, local=True)``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from megasft.config import ModelConfig
from megasft.data.batch import MicroBatch


def rope_kind(scaling: Optional[dict]) -> str:
    """default | llama3 | linear | longrope of a HF rope_scaling / rope_parameters dict ('su' is longrope)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return "longrope" if kind == "su" else kind


def rotary_dim(cfg: ModelConfig) -> int:
    """Dims of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
    return int(cfg.head_size * cfg.partial_rotary_factor)


def longrope_original_length(cfg: ModelConfig) -> int:
    """L0: Phi-3's top-level original_max_position_embeddings (transformers gives it priority),
    else rope_scaling's, else max_position_embeddings (transformers' standardize_rope_params)."""
    scaling = cfg.rope_scaling or {}
    return (cfg.original_max_position_embeddings or scaling.get("original_max_position_embeddings")
            or cfg.max_position_embeddings)


def _wavelength_powers(theta: float, dim: int) -> torch.Tensor:
    """theta^(2i/dim) [dim/2]: the inverse frequencies' denominators, before any scaling."""
    return theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)


def _llama3(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama-3.1: keep high frequencies, divide low ones by `factor`, interpolate between
    # (Meta's reference apply_scaling; identical to transformers' _compute_llama3_parameters).
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def longrope_attention_factor(cfg: ModelConfig) -> float:
    scaling, original = cfg.rope_scaling, longrope_original_length(cfg)
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling.get("factor") or cfg.max_position_embeddings / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def rope_problem(cfg: ModelConfig) -> Optional[str]:
    """Why megasft cannot build this RoPE, or None."""
    kind, r = rope_kind(cfg.rope_scaling), rotary_dim(cfg)
    if kind not in ("default", "llama3", "linear", "longrope"):
        return f"rope_scaling rope_type={kind!r} is not supported; use 'llama3', 'linear', 'longrope' ('su') or none"
    if r < 2 or r % 2:
        return (f"partial_rotary_factor={cfg.partial_rotary_factor} rotates {r} of head_dim={cfg.head_size} "
                "dims; it must be an even number >= 2")
    listed = (cfg.rope_scaling or {}).get("partial_rotary_factor", cfg.partial_rotary_factor)
    if listed != cfg.partial_rotary_factor:
        return (f"rope_scaling.partial_rotary_factor={listed} differs from model.partial_rotary_factor="
                f"{cfg.partial_rotary_factor}; set one value")
    if kind == "longrope":
        for key in ("short_factor", "long_factor"):
            factors = cfg.rope_scaling.get(key)
            if not isinstance(factors, list) or len(factors) != r // 2:
                return (f"longrope rope_scaling.{key} must be a list of rotary_dim/2 = {r // 2} numbers, "
                        f"got {factors!r}")
    return None


class Rope:
    """The rotary embedding of one model: cos_sin(batch, dtype) -> cos, sin [s, b, 1, r].
    `local`: Gemma 3's sliding layers (base rope_local_theta, no scaling)."""

    def __init__(self, cfg: ModelConfig, local: bool = False):
        problem = rope_problem(cfg)
        if problem:
            raise ValueError(problem)
        scaling = {} if local else cfg.rope_scaling or {}
        kind = rope_kind(scaling)
        theta = cfg.rope_local_theta if local else cfg.rope_theta
        powers = _wavelength_powers(theta, rotary_dim(cfg))                  # [r/2]
        self.inv_freq, self.long_inv_freq, self.long_after, self.scale = 1.0 / powers, None, 0, 1.0
        if kind == "llama3":
            self.inv_freq = _llama3(self.inv_freq, scaling)
        elif kind == "linear":
            self.inv_freq = self.inv_freq / scaling["factor"]
        elif kind == "longrope":   # 1 / (ext * theta^(2i/r)), written as transformers does
            self.inv_freq = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * powers)
            self.long_inv_freq = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * powers)
            self.long_after = longrope_original_length(cfg)
            self.scale = longrope_attention_factor(cfg)

    def cos_sin(self, batch: MicroBatch, dtype: torch.dtype):
        """cos, sin [s, b, 1, r] for the batch's position_ids [b, s] (angles in fp32)."""
        position_ids = batch.position_ids
        positions = position_ids.t().unsqueeze(-1).float()                   # [s, b, 1]
        angles = positions * self.inv_freq.to(position_ids.device)           # [s, b, r/2]
        if self.long_inv_freq is not None:
            # Each token takes its own document's factor (module docstring); no host sync.
            doc_len = batch.token_doc_lengths().to(position_ids.device).t()    # [s(/cp), b]
            long = (doc_len > self.long_after).unsqueeze(-1)
            angles = torch.where(long, positions * self.long_inv_freq.to(position_ids.device), angles)
        emb = torch.cat([angles, angles], dim=-1).unsqueeze(2)               # [s, b, 1, r]
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [s, b, n, d] rotated in its first r = cos.shape[-1] dims; dims r..d pass through."""
    r = cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    half = r // 2
    rotated = torch.cat([-rot[..., half:], rot[..., :half]], dim=-1)
    out = rot * cos + rotated * sin
    return out if rest.shape[-1] == 0 else torch.cat([out, rest], dim=-1)
