"""The dense SwiGLU MLP of a decoder layer (and, at another width, a MoE layer's shared experts)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megasft.config import ModelConfig
from megasft.model.families import family_of
from megasft.model.fused import resolve_norm_backend, swiglu_kernel
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear, enter_tp_region, tp_shards


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)) (Gemma: GeGLU, tanh GELU); gate and up fused in one
    column-parallel GEMM. `ffn_size` None = intermediate_size."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool, ffn_size: Optional[int] = None):
        super().__init__()
        self.group, self.sequence_parallel = ps.tp_group, sequence_parallel
        width = ffn_size or cfg.intermediate_size
        ffn = tp_shards(width, ps.tp_group)
        self.gate_up = ColumnParallelLinear(cfg.hidden_size, [ffn, ffn])
        self.down = RowParallelLinear(width, cfg.hidden_size, ps.tp_group, sequence_parallel)
        gemma = family_of(cfg.family).gemma
        self.swiglu = swiglu_kernel(resolve_norm_backend(cfg.norm_backend, ps.device, gemma), gelu_tanh=gemma)

    def forward(self, x):
        x = enter_tp_region(x, self.group, self.sequence_parallel)
        return self.down(self.swiglu(self.gate_up(x)))                      # [s, b, 2*ffn/tp] -> [s, b, ffn/tp]

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x already in the TP region [.., h] -> this rank's partial output [.., h], for a caller that
        sums it with others' under one exit_tp_region (a MoE layer's shared experts)."""
        return self.down.gemm(self.swiglu(self.gate_up(x)), self.down.weight, None)
