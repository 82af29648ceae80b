"""Mixture-of-experts shapes for the planner: active parameters, the experts a rank holds, and the
expert-parallel all-to-all volume (one formula, shared with any benchmark that measures it).

A MoE layer (megasft.model.moe; megasft.model.families.is_moe_layer) replaces the dense SwiGLU by a
router [E, h] and E experts, each a SwiGLU of width f = moe_ffn_size (3*h*f weights). Notation:
E = num_experts, k = moe_top_k, T = the tokens of one micro-batch in the TP region (s*b/cp: every
TP rank holds all of them after the SP all-gather), ep = parallel.ep, tp = parallel.tp.

Active parameters (what a token multiplies; Fedus et al. 2021; Mixtral's "12.9B active", Qwen3's
"3.3B activated"): every non-expert parameter plus k of the E experts of each MoE layer,

    N_active = N - sum over MoE layers of (E - k) * 3*h*f

so model FLOPs per token are 6 * N_active(matmuls) plus attention (megasft.planner.flops).

Experts per rank (Megatron-Core's expert parallelism, folded into DP x CP: megasft.parallel_state):
ep consecutive ranks of a stage's dp x cp ranks form an EP group and each holds E/ep experts of
every MoE layer, each expert's FFN split over tp (expert-TP): (E/ep) * 3*h*f/tp weights per MoE
layer. The router is replicated. An expert's weight is held alike by the dp*cp/ep ranks of equal
ep rank, the "expert data-parallel" group that reduces its gradient and shards its ZeRO-1 state.

All-to-all (megasft.model.dispatch.AllToAllDispatch), per MoE layer and micro-batch, one rank:

    counts    all-to-all of the per-expert slot counts [ep, E/ep] int64     (ep-1)/ep * E * 8
    dispatch  the T*k (token, pick) rows [T*k, h] to their experts' ranks     (ep-1)/ep * T*k*h*e
    combine   the experts' outputs back, the reverse all-to-all               (ep-1)/ep * T*k*h*e
    backward  the gradients of combine and dispatch, reversed                 2 * (ep-1)/ep * T*k*h*e

Under uniform routing (the load-balancing loss's aim) a rank keeps 1/ep of its slots; the rest
leave it. model.recompute=full reruns the layer's forward in backward (counts, dispatch and
combine again: combine's output is what the weighted sum saves); selective recomputes the
attention core only. Each TP rank exchanges with the EP peers of its own TP rank, so the volume
does not divide by tp.
"""
from __future__ import annotations

from megasft.config import Config, ModelConfig
from megasft.model.families import is_moe_layer, moe_ffn_size
from megasft.model.moe import MoEStats
from megasft.model.presets import count_parameters
from megasft.planner.pinned import rank_layer_ids

COUNT_BYTES = 8   # the slot counts are int64 (torch.bincount)


def moe_layer_ids(model: ModelConfig, layer_ids) -> list[int]:
    """The MoE layers among `layer_ids`."""
    return [i for i in layer_ids if is_moe_layer(model, i)]


def rank_moe_layers(cfg: Config, pp_rank: int) -> int:
    """MoE layers on pipeline rank ``pp_rank`` of a pinned config (none for a dense model, uncounted:
    the search asks this thousands of times)."""
    return len(moe_layer_ids(cfg.model, rank_layer_ids(cfg, pp_rank))) if cfg.model.num_experts else 0


def expert_weights(model: ModelConfig) -> int:
    """Weights of one routed expert: gate and up (h -> f) and down (f -> h)."""
    return 3 * model.hidden_size * moe_ffn_size(model)


def rank_expert_weights(model: ModelConfig, tp: int, ep: int) -> int:
    """Routed-expert weights of one MoE layer on one rank: E/ep experts, each's FFN / tp."""
    return model.num_experts // ep * 3 * model.hidden_size * (moe_ffn_size(model) // tp)


def router_weights(model: ModelConfig) -> int:
    """A MoE layer's router weight [E, h]."""
    return model.num_experts * model.hidden_size


def active_parameter_count(model: ModelConfig, vocab_size: int | None = None) -> int:
    """Parameters one token uses (the module docstring's N_active); count_parameters for a dense model."""
    idle = (model.num_experts - model.moe_top_k) * expert_weights(model)
    return count_parameters(model, vocab_size) - idle * len(moe_layer_ids(model, range(model.num_layers)))


def alltoall_calls(recomputed: bool) -> int:
    """All-to-alls one MoE layer runs per micro-batch: counts, dispatch, combine forward; the two
    reversed in backward; the forward's three again when the layer is recomputed."""
    return 3 * (2 if recomputed else 1) + 2


POOL_ELEMENT_BYTES = 8   # the pooled statistics are float64 (counts exact past 2^24 tokens)


def pooled_stats_bytes(cfg: Config) -> float:
    """Bytes one rank sends per micro-batch pooling the router statistics over its pipeline group:
    one ring all-reduce of MoEStats.pooled_numel(E) float64 (megasft.training.moe_aux), made by
    every stage, MoE layers or not; nothing without experts or pipeline stages."""
    pp = cfg.parallel.pp
    if not cfg.model.num_experts or pp == 1:
        return 0.0
    return 2 * (pp - 1) / pp * MoEStats.pooled_numel(cfg.model.num_experts) * POOL_ELEMENT_BYTES


def alltoall_bytes(tokens: int, top_k: int, hidden: int, num_experts: int, ep: int, element_bytes: int,
                   recomputed: bool = False) -> float:
    """Bytes one rank sends over its EP group in one MoE layer for one micro-batch: forward (counts,
    dispatch, combine), backward (combine's and dispatch's gradients) and, when ``recomputed``
    (model.recompute=full), the forward again; uniform routing, T = ``tokens`` in the TP region."""
    if ep == 1:
        return 0.0
    leaves = (ep - 1) / ep
    rows = leaves * tokens * top_k * hidden * element_bytes      # one dispatch or combine: [T*k, h]
    forward = leaves * num_experts * COUNT_BYTES + 2 * rows
    return forward * (2 if recomputed else 1) + 2 * rows
