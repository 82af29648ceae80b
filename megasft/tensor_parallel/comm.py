"""Autograd-aware collectives of tensor and sequence parallelism.

Each operator is a pair (forward collective, backward collective) so that a layer's gradient is
exactly the gradient of the unsharded layer (Shoeybi et al. 2019, "Megatron-LM", Fig. 3; and
Korthikanti et al. 2022 for the sequence-parallel pair):

    copy_to_tp            Megatron's f: identity forward, all-reduce backward
    reduce_from_tp        Megatron's g: all-reduce forward, identity backward
    gather_from_sp        SP's g:  all-gather along the sequence forward, reduce-scatter backward
    reduce_scatter_to_sp  SP's g-bar: reduce-scatter along the sequence forward, all-gather backward
    scatter_to_sp         split along the sequence forward, all-gather backward
    gather_last_dim       all-gather along the last dim forward, split backward (inference logits)

Activations are [s, b, h] (sequence first) so sequence collectives work on contiguous dim 0.
A group of None means size 1: every operator is then the identity.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.parallel_state import group_rank, group_size

Group = Optional[dist.ProcessGroup]


def all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    collectives.all_reduce(x, group)
    return x


def all_gather_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    x = x.contiguous()
    out = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.all_gather_into(out, x, group)
    return out


def reduce_scatter_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[0] % world:
        raise ValueError(f"cannot reduce-scatter dim 0 of size {x.shape[0]} over {world} ranks")
    x = x.contiguous()
    out = torch.empty((x.shape[0] // world,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    collectives.reduce_scatter_into(out, x, group)
    return out


def split_dim(x: torch.Tensor, dim: int, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split dim {dim} of size {x.shape[dim]} over {world} ranks")
    return x.chunk(world, dim=dim)[group_rank(group)].contiguous()


def all_gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    moved = all_gather_dim0(x.movedim(-1, 0), group)   # [world * h/tp, ...]
    return moved.movedim(0, -1).contiguous()


def _identity(x: torch.Tensor, group: Group) -> torch.Tensor:
    return x


def _all_reduce_copy(x: torch.Tensor, group: Group) -> torch.Tensor:
    return all_reduce(x.contiguous(), group)


def _split_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    return split_dim(x, x.dim() - 1, group)


def _split_dim0(x: torch.Tensor, group: Group) -> torch.Tensor:
    return split_dim(x, 0, group)


def _collective_pair(name: str, forward_fn, backward_fn) -> type[torch.autograd.Function]:
    """An autograd operator running `forward_fn` forward and `backward_fn` on the gradient."""
    def forward(ctx, x, group):
        ctx.group = group
        return forward_fn(x, group)

    def backward(ctx, grad):
        return backward_fn(grad, ctx.group), None

    return type(name, (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


# Megatron's f, g and their sequence-parallel counterparts: (forward collective, backward collective).
# f = _CopyToTP, g = _ReduceFromTP.
_CopyToTP = _collective_pair("CopyToTP", _identity, _all_reduce_copy)
_ReduceFromTP = _collective_pair("ReduceFromTP", _all_reduce_copy, _identity)
_GatherFromSP = _collective_pair("GatherFromSP", all_gather_dim0, reduce_scatter_dim0)
_ReduceScatterToSP = _collective_pair("ReduceScatterToSP", reduce_scatter_dim0, all_gather_dim0)
_ScatterToSP = _collective_pair("ScatterToSP", _split_dim0, all_gather_dim0)
_GatherLastDim = _collective_pair("GatherLastDim", all_gather_last_dim, _split_last_dim)


def _apply(fn, x: torch.Tensor, group: Group) -> torch.Tensor:
    return x if group_size(group) == 1 else fn.apply(x, group)


def copy_to_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """f: identity forward, all-reduce of the input gradient backward."""
    return _apply(_CopyToTP, x, group)


def reduce_from_tp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """g: all-reduce forward (sum of partial outputs), identity backward."""
    return _apply(_ReduceFromTP, x, group)


def gather_from_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s/tp, b, h] -> [s, b, h]; backward reduce-scatters the gradient."""
    return _apply(_GatherFromSP, x, group)


def reduce_scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, b, h] partial sums -> [s/tp, b, h] reduced; backward all-gathers."""
    return _apply(_ReduceScatterToSP, x, group)


def scatter_to_sp(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[s, b, h] replicated -> this rank's [s/tp, b, h]; backward all-gathers."""
    return _apply(_ScatterToSP, x, group)


def gather_last_dim(x: torch.Tensor, group: Group) -> torch.Tensor:
    """[..., h/tp] -> [..., h]; backward keeps this rank's slice of the gradient."""
    return _apply(_GatherLastDim, x, group)
