"""Tensor-parallel layers. Each parameter they create gets its ParamSpec (megasft.tensor_parallel.spec):
how it is cut from the canonical HF tensor, and — for replicated parameters — its copies and the
group that sums its partial gradients.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from megasft import collectives
from megasft.parallel_state import group_rank, group_size
from megasft.tensor_parallel.comm import (Group, copy_to_tp, gather_from_sp, reduce_from_tp,
                                          reduce_scatter_to_sp)
from megasft.tensor_parallel.spec import Shard, TPSplit, set_spec, spec_of

# The local GEMM of the TP linears, y = x W^T (+ b), as F.linear takes it. The layers do their TP/SP
# communication around it; megasft.model.fp8 swaps in Transformer Engine's FP8 GEMM here.
GemmFn = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor]], torch.Tensor]


def mark_replicated(param: nn.Parameter, copies: int, sync_group: Group) -> nn.Parameter:
    """A parameter held identically by `copies` TP ranks; `sync_group` (or None) sums its partial
    gradients."""
    return set_spec(param, tp_copies=copies, grad_sync_group=sync_group if group_size(sync_group) > 1 else None)


def tp_shards(size: int, group: Group) -> Shard:
    """The even TP split of a canonical dim of `size` over `group`."""
    world = group_size(group)
    if size % world:
        raise ValueError(f"dimension {size} is not divisible by tensor-parallel size {world}")
    return Shard(size, world, group_rank(group))


def new_weight(rows: int, cols: int, split: TPSplit, dtype: torch.dtype = torch.float32) -> nn.Parameter:
    """An uninitialised [rows, cols] parameter cut from its canonical tensors by `split`."""
    # Real values come from megasft.model.build.init_weights or the HF import (layout-independent);
    # empty here avoids paying twice.
    return set_spec(nn.Parameter(torch.empty(rows, cols, dtype=dtype)), split=split)


def enter_tp_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Input of column-parallel layers: [s/tp, b, h] -> [s, b, h] under SP, else f (copy)."""
    return gather_from_sp(x, group) if sequence_parallel else copy_to_tp(x, group)


def exit_tp_region(x: torch.Tensor, group: Group, sequence_parallel: bool) -> torch.Tensor:
    """Output of row-parallel layers: partial sums [s, b, h] -> [s/tp, b, h] under SP, else g."""
    return reduce_scatter_to_sp(x, group) if sequence_parallel else reduce_from_tp(x, group)


class ColumnParallelLinear(nn.Module):
    """Y = X A with A's output dim split over TP (each part of a fused weight split separately).

    Expects its input already in the TP region (see enter_tp_region): callers feeding several
    column-parallel layers from one activation gather it once.
    """

    def __init__(self, in_features: int, out_parts: Sequence[Shard], bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        split = TPSplit(0, tuple(out_parts))
        out_local = sum(p.local for p in out_parts)
        self.weight = new_weight(out_local, in_features, split, dtype)   # [out/tp, in]
        self.bias = None
        if bias:
            self.bias = set_spec(nn.Parameter(torch.empty(out_local, dtype=dtype)), split=split)
        self.gemm: GemmFn = F.linear    # a plain callable: adds no parameters or state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gemm(x, self.weight, self.bias)                        # [s, b, out/tp]


class RowParallelLinear(nn.Module):
    """Y = X A with A's input dim split over TP; partial products are summed by exit_tp_region
    (all-reduce, or reduce-scatter along the sequence under SP)."""

    def __init__(self, in_features: int, out_features: int, group: Group,
                 sequence_parallel: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        split = TPSplit(1, (tp_shards(in_features, group),))
        self.weight = new_weight(out_features, split.parts[0].local, split, dtype)   # [out, in/tp]
        self.gemm: GemmFn = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partial = self.gemm(x, self.weight, None)                           # [s, b, out] partial sum
        return exit_tp_region(partial, self.group, self.sequence_parallel)  # [s(/tp), b, out]


class VocabParallelEmbedding(nn.Module):
    """Embedding whose (padded) vocabulary rows are split over TP. Each rank looks up the ids in
    its range, zeros the rest, and the partial embeddings are summed over TP."""

    def __init__(self, vocab_size: int, padded_vocab_size: int, hidden_size: int, group: Group,
                 sequence_parallel: bool, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.group, self.sequence_parallel = group, sequence_parallel
        shard = Shard(vocab_size, group_size(group), group_rank(group), padded=padded_vocab_size)
        self.vocab_start, self.vocab_end = shard.start, shard.start + shard.local
        self.weight = new_weight(shard.local, hidden_size, TPSplit(0, (shard,)), dtype)  # [V/tp, h]

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.t()                                                 # [b, s] -> [s, b]
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local_ids = (ids - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local_ids, self.weight)                           # [s, b, h]
        if group_size(self.group) > 1:
            emb = emb.masked_fill(outside.unsqueeze(-1), 0.0)
        return exit_tp_region(emb, self.group, self.sequence_parallel)     # [s(/tp), b, h]


def sync_replicated_grads(params: Iterable[nn.Parameter], grad_of: Callable[[nn.Parameter], Optional[torch.Tensor]]) -> None:
    """Sum the partial gradients of replicated parameters over their spec's grad_sync_group, one
    coalesced all-reduce per group. ``grad_of(param)`` is the gradient to sum (the fp32 main grad
    under the optimizer, ``.grad`` without one)."""
    by_group: dict = {}
    for p in params:
        group, grad = spec_of(p).grad_sync_group, grad_of(p)
        if group is not None and grad is not None:
            by_group.setdefault(group, []).append(grad)
    for group, grads in by_group.items():
        flat = torch.cat([g.reshape(-1) for g in grads])
        collectives.all_reduce(flat, group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
