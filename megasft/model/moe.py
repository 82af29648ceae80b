"""The mixture-of-experts MLP of a decoder layer: route -> dispatch -> local experts -> combine.

A MoE layer takes the place of a decoder layer's dense SwiGLU MLP (megasft.model.llama.DecoderLayer
builds one where megasft.model.families.is_moe_layer says so). Every token goes to its top-k of E
experts, each a SwiGLU MLP of width moe_ffn_size, and their outputs are summed with the routing
weights. No token is dropped unless model.moe_capacity_factor is set: an expert takes every token
routed to it, or at most its capacity of them (megasft.model.dispatch.capacity_keep), the slots
over capacity adding nothing to their tokens.

The four steps are separate pieces so that expert parallelism replaces only the middle ones:

  route     megasft.model.router, by model.moe_router: Router (softmax top-k, renormalised with
            moe_norm_topk_prob; Mixtral, Qwen3-MoE) or SigmoidGroupRouter (DeepSeek-V3's biased,
            group-limited sigmoid top-k with its auxiliary-loss-free bias).
  dispatch  megasft.model.dispatch: the T*k (token, pick) slots ordered by expert, each slot a copy
            of its token's row -> [T*k, h] grouped by expert, and the rows per expert; under
            expert parallelism (parallel.ep) followed by an all-to-all to the ranks holding them.
  experts   RoutedExperts: each local expert's SwiGLU on its contiguous rows (a loop, or one
            torch._grouped_mm per projection over all of them).
  combine   the slots back in token order (EP: after the reverse all-to-all), times their
            routing weights, summed over each token's k picks; plus the shared experts' SwiGLU of
            every token (moe_shared_experts, DeepSeek's n_shared_experts).

Tensor parallelism (expert-TP): every expert's FFN dim is split over TP like the dense MLP's, so
the layer's output is a partial sum reduced by the same exit_tp_region. The router is replicated
and runs on the tokens as they arrive ([s/tp, b] under sequence parallelism, as in Megatron-Core);
its routing weights enter the TP region as the activations do (f, or the SP all-gather), so the
backward of that step sums the weights' partial gradients over TP and every rank's router sees the
full gradient of its own tokens. The router weight is then a replicated parameter whose gradient
is summed over TP only under SP, like the norms'.

Auxiliary losses, per micro-batch (megasft.training.moe_aux adds them to the backward, the loop logs
them):

  load balancing  transformers' ``load_balancing_loss_func`` (Fedus et al. 2021, Switch
            Transformer, eq. 4-6): over every MoE layer l and token t of the micro-batch, with N the
            number of (l, t) pairs, f_i = (top-k picks of expert i) / N and P_i = (sum of expert i's
            softmax probability) / N; aux = E * sum_i f_i * P_i. f is a count and carries no
            gradient. Like transformers, f and P pool all MoE layers (not a sum of per-layer
            losses): each layer returns its RouterStats, a chunk sums its layers' into MoEStats
            (moe_stats), and megasft.training.moe_aux pools the chunks of all pipeline stages.
            The tokens are all s*b slots of the micro-batch, padding included, as transformers
            counts them without an attention mask (and Megatron-Core does).
  z-loss    ST-MoE (Zoph et al. 2022, eq. 5): mean over the same (l, t) pairs of
            logsumexp(router logits)^2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from megasft import collectives
from megasft.config import ModelConfig
from megasft.errors import ConfigError
from megasft.model.dispatch import capacity_keep, dispatcher
from megasft.model.families import moe_ffn_size
from megasft.model.fused import resolve_norm_backend, swiglu_kernel
from megasft.model.mlp import MLP
from megasft.model.router import Router, RouterStats, build_router, router_stats
from megasft.parallel_state import ParallelState, group_size
from megasft.tensor_parallel.comm import Group, all_gather_dim0, reduce_from_tp
from megasft.tensor_parallel.layers import enter_tp_region, exit_tp_region, new_weight, tp_shards
from megasft.tensor_parallel.spec import TPSplit, set_spec

# The routers live in megasft.model.router; Router, RouterStats and router_stats import from here too.
__all__ = ["MoE", "MoEStats", "RoutedExperts", "Router", "RouterStats",
           "moe_groups", "moe_stats", "resolve_experts_backend", "router_stats"]


@dataclass(frozen=True)
class MoEStats:
    """The router statistics of one micro-batch over the MoE layers of one model chunk, the
    micro-batch's other token shares (SP, CP) summed in. ``aux`` and ``z`` are the losses of these
    layers alone — the micro-batch's own when the chunk holds every MoE layer (pp=1)."""

    load: torch.Tensor         # [layers, E] tokens routed to each expert of each MoE layer (no gradient)
    prob_sum: torch.Tensor     # [E] router probabilities summed over the (layer, token) pairs
    lse_sq: torch.Tensor       # [] logsumexp(router logits)^2 summed over the same pairs
    pairs: int                 # (layer, token) pairs: MoE layers x tokens of the micro-batch
    num_experts: int
    dropped: Optional[torch.Tensor] = None   # [layers, E] picks over capacity (moe_capacity_factor only)

    @property
    def aux(self) -> torch.Tensor:
        """[] the load-balancing loss E * sum_i f_i P_i (unweighted; the coefficient is the loop's)."""
        fraction = self.load.sum(dim=0) / self.pairs                        # f_i
        return self.num_experts * (fraction * (self.prob_sum / self.pairs)).sum()

    @property
    def z(self) -> torch.Tensor:
        """[] the router z-loss."""
        return self.lse_sq / self.pairs

    @staticmethod
    def pooled_numel(num_experts: int) -> int:
        """Length of the vector a micro-batch's statistics are pooled over the pipeline stages in
        (megasft.training.moe_aux): [F (E picks) | P (E probability sums) | Z | N]."""
        return 2 * num_experts + 2


def resolve_experts_backend(name: str, device: torch.device, dtype: Optional[torch.dtype]) -> str:
    """'auto' -> grouped_mm on CUDA in bf16 on sm90+ where torch has it, else loop; an explicit
    grouped_mm this torch lacks is an error."""
    has_grouped = hasattr(torch, "_grouped_mm")
    if name == "grouped_mm" and not has_grouped:
        raise ConfigError(f"model.moe_experts_backend=grouped_mm needs torch._grouped_mm, which torch "
                          f"{torch.__version__} lacks; use moe_experts_backend=loop or auto")
    if name != "auto":
        return name
    cuda_ok = device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return "grouped_mm" if has_grouped and cuda_ok else "loop"


class RoutedExperts(nn.Module):
    """`count` SwiGLU experts (global ids first .. first+count-1), each's FFN dim split over TP.

    gate_up [count * 2f/tp, h] stacks every expert's [gate_proj; up_proj] rows (this rank's shard
    of each), down [h, count * f/tp] their down_proj columns: 2-D parameters cut from the per-expert
    canonical tensors by an ordinary TPSplit, so init, HF import/export, checkpoints and ZeRO-1 treat
    them like any other weight, while gate_up.view(count, 2f/tp, h) and down.t().view(count, f/tp, h)
    are the per-expert matrices a grouped GEMM takes without copying.
    """

    def __init__(self, cfg: ModelConfig, ps: ParallelState, first: int, count: int):
        super().__init__()
        shard = tp_shards(moe_ffn_size(cfg), ps.tp_group)
        self.count, self.ffn = count, shard.local
        self.gate_up = new_weight(count * 2 * shard.local, cfg.hidden_size, TPSplit(0, (shard, shard) * count))
        self.down = new_weight(cfg.hidden_size, count * shard.local, TPSplit(1, (shard,) * count))
        for p in (self.gate_up, self.down):
            set_spec(p, experts=(first, count))
        self.swiglu = swiglu_kernel(resolve_norm_backend(cfg.norm_backend, ps.device))
        # 'auto' is resolved on the first forward, where the device and dtype are known.
        self.requested = cfg.moe_experts_backend
        self.backend = None if self.requested == "auto" else resolve_experts_backend(self.requested, ps.device, None)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Rows grouped by expert [N, h], rows per expert [count] -> partial outputs [N, h]."""
        if self.backend is None:
            self.backend = resolve_experts_backend(self.requested, x.device, x.dtype)
        w1 = self.gate_up.view(self.count, 2 * self.ffn, -1)             # [E_l, 2f/tp, h]
        w2 = self.down.t().view(self.count, self.ffn, -1)                # [E_l, f/tp, h] = down_proj^T per expert
        if self.backend == "grouped_mm":
            offsets = counts.cumsum(0).to(torch.int32)
            hidden = torch._grouped_mm(x, w1.transpose(1, 2), offs=offsets)      # [N, 2f/tp]
            return torch._grouped_mm(self.swiglu(hidden), w2, offs=offsets)      # [N, h]
        outs = [self.swiglu(F.linear(rows, w1[e])) @ w2[e] for e, rows in enumerate(x.split(counts.tolist()))]
        return torch.cat(outs)


class MoE(nn.Module):
    """A decoder layer's MoE MLP: this rank's num_experts / ep experts (all of them at ep=1),
    expert-TP over ps.tp_group. forward returns (output [s(/tp), b, h], RouterStats)."""

    def __init__(self, cfg: ModelConfig, ps: ParallelState, sequence_parallel: bool):
        super().__init__()
        self.group, self.sequence_parallel, self.tp_rank = ps.tp_group, sequence_parallel, ps.tp_rank
        self.num_experts, self.capacity_factor, self.drop_policy = cfg.num_experts, cfg.moe_capacity_factor, cfg.moe_drop_policy
        self.router = build_router(cfg, ps, sequence_parallel)
        # A plain object (no parameters): the experts all here, or spread over the EP group.
        self.dispatcher = dispatcher(cfg.num_experts, ps)
        per_rank = cfg.num_experts // ps.ep
        self.experts = RoutedExperts(cfg, ps, ps.ep_rank * per_rank, per_rank)
        # DeepSeek's shared experts: one SwiGLU as wide as all of them, on every token, split over TP.
        self.shared_experts = (MLP(cfg, ps, sequence_parallel, cfg.moe_shared_experts * moe_ffn_size(cfg))
                               if cfg.moe_shared_experts else None)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterStats]:
        s, b, h = x.shape
        logits, probs, weights, experts = self.router(x.reshape(-1, h))     # [s(/tp)*b, E], [.., k]
        stats = router_stats(logits, probs, experts)
        k = weights.shape[-1]
        # Tokens, routing weights and expert ids enter the TP region together ([s/tp] -> [s] under SP).
        tokens = enter_tp_region(x, self.group, self.sequence_parallel).reshape(-1, h)          # [s*b, h]
        weights = enter_tp_region(weights.view(s, b, k), self.group, self.sequence_parallel).reshape(-1, k)
        if self.sequence_parallel:
            experts = all_gather_dim0(experts.view(s, b, k), self.group).reshape(-1, k)          # ids: no gradient
        keep = None
        if self.capacity_factor is not None:   # over the TP region's tokens: alike on every TP rank
            keep = capacity_keep(experts, weights, self.num_experts, self.capacity_factor, self.drop_policy)
            stats = stats._replace(dropped=self._own_dropped(experts, keep, s * b, stats.counts.dtype))
        rows, counts, state = self.dispatcher.dispatch(tokens, experts, keep)
        out = self.dispatcher.combine(self.experts(rows, counts), weights, state)              # [s*b, h] partial
        if self.shared_experts is not None:   # partial too: the one exit below sums both over TP
            out = out + self.shared_experts.partial(tokens)
        return exit_tp_region(out.view(-1, b, h), self.group, self.sequence_parallel), stats   # [s(/tp), b, h]

    def _own_dropped(self, experts: torch.Tensor, keep: torch.Tensor, own_tokens: int, dtype) -> torch.Tensor:
        """[E] dropped picks per expert of the tokens this rank's router saw (its [s/tp] share under
        SP, where the TP region's rows are the ranks' shares in TP order), as RouterStats counts them."""
        if self.sequence_parallel:
            own = slice(self.tp_rank * own_tokens, (self.tp_rank + 1) * own_tokens)
            experts, keep = experts[own], keep[own]
        return torch.bincount(experts[~keep], minlength=self.num_experts).to(dtype)


def moe_stats(stats: list[RouterStats], num_experts: int, groups: list[Group]) -> MoEStats:
    """A chunk's MoEStats from its MoE layers' RouterStats (see the module docstring). `groups` hold
    the other shares of the micro-batch's tokens (the TP group under sequence parallelism, the CP
    group): their statistics are summed — probabilities with Megatron's g (all-reduce forward,
    identity backward), since every rank back-propagates the same loss."""
    load = torch.stack([s.counts for s in stats])                           # [layers, E]
    prob_sum = torch.stack([s.prob_sum for s in stats]).sum(dim=0)          # [E]
    lse_sq = torch.stack([s.lse_sq_sum for s in stats]).sum()
    pairs = sum(s.tokens for s in stats)                                    # (layer, token) pairs here
    # Dropped picks ride with the load (one all-reduce): [layers, E] each.
    counted = load if stats[0].dropped is None else torch.cat([load, torch.stack([s.dropped for s in stats])])
    for group in groups:
        if group_size(group) > 1:
            counted = counted.clone()
            collectives.all_reduce(counted, group)
            prob_sum, lse_sq = reduce_from_tp(prob_sum, group), reduce_from_tp(lse_sq, group)
            pairs *= group_size(group)
    layers = load.shape[0]
    dropped = counted[layers:] if stats[0].dropped is not None else None
    return MoEStats(counted[:layers], prob_sum, lse_sq, pairs, num_experts, dropped)


def moe_groups(ps: ParallelState, sequence_parallel: bool) -> list[Optional[object]]:
    """The groups over which one micro-batch's router tokens are spread: TP under sequence
    parallelism, and CP (each rank holds s/cp of every row)."""
    return [ps.tp_group if sequence_parallel else None, ps.cp_group]
