"""The planner's modelling assumptions, in one place so a user can see and override them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Assumptions:
    matmul_efficiency: float = 0.70
    """Fraction of peak bf16 FLOP/s that the layers' GEMMs reach (cuBLAS on H100 reaches roughly
    0.65-0.75 at hidden sizes of 4096 and up). A calibration knob: fit it to one measured step."""
    attention_efficiency: float = 0.35
    """Fraction of peak reached by the flash-attention kernels, forward and backward averaged
    (FlashAttention-2 on H100 runs at about 300-350 TFLOP/s; Dao 2023, Fig. 5-6)."""
    elementwise_passes: float = 4.0
    """Times the memory-bound ops (norms, RoPE, SiLU*up, residual adds, casts) stream a layer's
    activations per micro-batch: written in forward, read in backward, gradient written and read
    (full recompute adds one more forward write). Their time is these bytes / HBM bandwidth."""
    causal_attention: bool = True
    """Attention kernels skip the masked upper triangle, executing half of the s^2 FLOPs (timing only;
    model FLOPs for MFU count the full 12*L*h*s term as Narayanan et al. 2021 eq. (3) does)."""
    loss_chunk_tokens: Optional[int] = None
    """Tokens per chunk of the vocab-parallel cross-entropy; None = whole micro-batch at once.
    (ModelConfig has no field for this yet, hence an assumption.)"""
    sp_regathers_inputs: bool = False
    """True if column-parallel linears under SP keep only the sequence-sharded input and all-gather it
    again in backward (Korthikanti et al. 2022 Sec. 4.2.2). False matches megasft's autograd
    operators, where the linear after the SP all-gather saves the gathered [s, b, h] input."""
    reserved_gib: float = 3.0
    """Memory outside PyTorch tensors: CUDA context (~0.5 GiB), NCCL communicators and their
    buffers for the TP/PP/DP groups (~1-2 GiB), cuBLAS/flash-attn workspaces."""
    fragmentation: float = 0.05
    """Caching-allocator slack as a fraction of the memory PyTorch allocates."""
    p2p_overlap: float = 0.0
    """Fraction of pipeline send/recv time hidden behind compute (0 = all on the critical path)."""
    cp_latency_us: float = 10.0
    """Fixed cost of one context-parallel exchange (a ring step's send/recv pair or one all-to-all)
    before its bytes move: NCCL launch plus a network round trip, ~5-20 us across InfiniBand. It is
    what makes many small ring steps lose to fewer all-to-alls at large cp and short rows."""
    ep_latency_us: float = 10.0
    """Fixed cost of one expert-parallel all-to-all (the slot counts, a dispatch or a combine) before
    its bytes move; as cp_latency_us. A MoE layer runs 5 per micro-batch (8 under full recompute)."""
