"""A MoE layer's token dispatch and combine: LocalDispatch when every expert is on this rank,
AllToAllDispatch under expert parallelism (parallel.ep; megasft.parallel_state carves the
expert-parallel group from the DP ranks).

Each of the ep ranks holds E/ep consecutive experts (rank r: experts r*E/ep .. (r+1)*E/ep - 1) and
its own tokens (different rows, as DP ranks have). One MoE layer's forward:

    route       on this rank's tokens (megasft.model.moe.Router, unchanged)
    permute     the T*k (token, pick) slots into global-expert order: LocalDispatch's permutation,
                which also orders them by destination rank                      [T*k, h]
    counts      all-to-all of the per-expert slot counts [ep, E/ep] -> [ep (source), E/ep]
    dispatch    all-to-all of the slots with variable splits (rows per destination rank)   [R, h]
    regroup     the received rows, source-major, into local-expert order (a permutation)
    experts     the local experts on their contiguous rows (RoutedExperts, unchanged)
    return      the inverse permutation, then the reverse all-to-all (the splits swapped)  [T*k, h]
    combine     back into token order times the routing weights (LocalDispatch.combine)

The all-to-all's backward is the reverse all-to-all of the gradients, so each expert's weight
gradient holds the contributions of every EP rank's tokens; it is then reduced over the dp*cp/ep
ranks that hold the same experts (ParallelState.expert_grad_group) by the optimizer's grad buffer.
Under expert-TP the TP region's tokens are the same on every TP rank, and each TP rank exchanges
with the EP peers of its own TP rank (the ep group is per TP rank), each running its FFN shard.
No token is dropped unless model.moe_capacity_factor is set: then `capacity_keep` marks the slots
within each expert's capacity, the others sort behind every expert's (as a virtual expert E), are
neither sent nor computed, and combine gives them zero rows.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Union

import torch

from megasft import collectives
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.comm import Group


class Dispatched(NamedTuple):
    """What combine needs to undo a dispatch."""

    inverse: torch.Tensor      # [T*k] position of each (token, pick) slot in the expert order
    tokens: int
    dropped: int = 0           # slots over capacity: the last ones of the expert order, not computed


def capacity_keep(experts: torch.Tensor, weights: torch.Tensor, num_experts: int, factor: float,
                  policy: str) -> torch.Tensor:
    """[T, k] bool: the (token, pick) slots each expert keeps within its capacity
    ceil(factor * T * k / E) — the highest routing weights (policy "probs", ties by slot order) or
    the first slots in token order ("position"). A function of the ids and weights alone, so the TP
    ranks, which route the same tokens alike, keep the same slots."""
    tokens, k = experts.shape
    capacity = math.ceil(factor * tokens * k / num_experts)
    flat = experts.reshape(-1)
    order = torch.arange(flat.numel(), device=flat.device)
    if policy == "probs":
        order = torch.argsort(weights.detach().reshape(-1), descending=True, stable=True)
    order = order[torch.argsort(flat[order], stable=True)]              # by expert, then priority
    counts = torch.bincount(flat, minlength=num_experts)
    first = counts.cumsum(0) - counts                                   # each expert's first place
    place = torch.arange(flat.numel(), device=flat.device) - first[flat[order]]
    keep = torch.empty_like(flat, dtype=torch.bool)
    keep[order] = place < capacity
    return keep.view(tokens, k)


class LocalDispatch:
    """Dispatch and combine when every expert is on this rank (no expert parallelism): a
    permutation of the (token, pick) slots into expert order and back. Gathers of a permutation
    only (each token's k copies made by expand), so the backward is deterministic."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, keep: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, Dispatched]:
        """x [T, h], expert ids [T, k], optionally the slots within capacity [T, k] -> (kept rows
        grouped by expert [T*k - dropped, h], rows per expert [E], state)."""
        tokens, k = experts.shape
        flat = experts.reshape(-1)
        if keep is not None:   # a dropped slot goes to a virtual expert E, after every real one's
            flat = torch.where(keep.reshape(-1), flat, self.num_experts)
        order = torch.argsort(flat, stable=True)                   # slot ids in expert order
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        slots = x.unsqueeze(1).expand(tokens, k, x.shape[-1]).reshape(tokens * k, -1)   # [T*k, h]
        counts = torch.bincount(flat, minlength=self.num_experts + 1)[:self.num_experts]
        dropped = 0 if keep is None else tokens * k - int(counts.sum())   # a host sync, capacity only
        return slots[order[:order.numel() - dropped]], counts, Dispatched(inverse, tokens, dropped)

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: Dispatched) -> torch.Tensor:
        """Expert outputs of the kept slots in expert order [T*k - dropped, h], routing weights
        [T, k] -> [T, h]; a dropped slot contributes nothing."""
        k = weights.shape[-1]
        if state.dropped:
            y = torch.cat([y, y.new_zeros(state.dropped, y.shape[-1])])
        per_pick = y[state.inverse].view(state.tokens, k, -1)       # [T, k, h]
        return (per_pick * weights.unsqueeze(-1)).sum(dim=1)


class _AllToAll(torch.autograd.Function):
    """Rows in_splits[j] of x to rank j, out_splits[i] rows from rank i; backward the reverse."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        collectives.all_to_all_uneven(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        collectives.all_to_all_uneven(back, grad.contiguous(), in_splits, out_splits, ctx.group)
        return back, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: Group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertDispatched(NamedTuple):
    """What combine needs to undo an expert-parallel dispatch."""

    local: Dispatched          # the global-expert permutation of this rank's slots
    regroup: torch.Tensor      # [R] received row of each local-expert-ordered row
    restore: torch.Tensor      # [R] the inverse of regroup
    sent: list[int]            # slots sent to each EP rank
    received: list[int]        # rows received from each EP rank


class AllToAllDispatch:
    """Dispatch and combine over an expert-parallel group of `ep` ranks, each holding
    num_experts / ep experts. A plain object (no parameters), like LocalDispatch."""

    def __init__(self, num_experts: int, ep: int, group: Group):
        self.ep, self.local_experts, self.group = ep, num_experts // ep, group
        self.permute = LocalDispatch(num_experts)

    def dispatch(self, x: torch.Tensor, experts: torch.Tensor, keep: Optional[torch.Tensor] = None
                 ) -> tuple[torch.Tensor, torch.Tensor, ExpertDispatched]:
        """x [T, h], expert ids [T, k], optionally the slots within capacity [T, k] -> (rows of this
        rank's experts grouped by local expert [R, h], rows per local expert [E/ep], state)."""
        slots, counts, local = self.permute.dispatch(x, experts, keep)        # [T*k - dropped, h], [E]
        per_rank = counts.view(self.ep, self.local_experts)                   # [ep (destination), E/ep]
        incoming = torch.empty_like(per_rank)                                 # [ep (source), E/ep]
        collectives.all_to_all_single(incoming, per_rank.contiguous(), self.group)
        sent, received = per_rank.sum(1).tolist(), incoming.sum(1).tolist()
        rows = all_to_all(slots, received, sent, self.group)                  # [R, h] source-major
        # Received rows are (source, local expert)-ordered; the experts need (local expert, source).
        expert_of_row = torch.arange(self.local_experts, device=x.device).repeat(self.ep)
        expert_of_row = torch.repeat_interleave(expert_of_row, incoming.reshape(-1))
        regroup = torch.argsort(expert_of_row, stable=True)
        restore = torch.empty_like(regroup)
        restore[regroup] = torch.arange(regroup.numel(), device=regroup.device)
        state = ExpertDispatched(local, regroup, restore, sent, received)
        return rows[regroup], incoming.sum(0), state

    def combine(self, y: torch.Tensor, weights: torch.Tensor, state: ExpertDispatched) -> torch.Tensor:
        """Local experts' outputs [R, h] in local-expert order, routing weights [T, k] -> [T, h]."""
        back = all_to_all(y[state.restore], state.sent, state.received, self.group)   # [T*k - dropped, h]
        return self.permute.combine(back, weights, state.local)


def dispatcher(num_experts: int, ps: ParallelState) -> Union[LocalDispatch, AllToAllDispatch]:
    """The dispatch of a MoE layer on this rank: local at ep=1, all-to-all over ps.ep_group else."""
    return LocalDispatch(num_experts) if ps.ep == 1 else AllToAllDispatch(num_experts, ps.ep, ps.ep_group)
