"""Exact per-rank parameter, gradient and optimizer-state bytes of a layout.

These are the numbers a measured run can be checked against tensor by tensor, so they follow how
megasft shards each weight (``megasft.tensor_parallel.layers``) rather than a rule of thumb:

* q/k/v projections are column-parallel over heads. Query heads split evenly; key/value heads
  split when tp <= num_kv_heads and are replicated (one kv head per rank) when tp > num_kv_heads.
  q/k/v biases (Qwen2-style) follow their columns.
* o_proj and down_proj are row-parallel, gate/up column-parallel: each holds 1/tp of the matrix.
* RMSNorm weights are replicated on every TP rank (with or without sequence parallelism).
* The embedding and LM head are vocab-parallel over ``padded_vocab_size(tp) / tp`` rows; the padded
  rows are allocated, so they are counted here.
* The first pipeline stage holds the embedding, the last the final norm and LM head (under ZBV
  the first holds both: ``Layout.head_rank``). With tied embeddings and pp > 1 the head's chunk
  keeps its own copy of the embedding as the LM head, kept equal by summing their gradients over
  the embedding group (Megatron-LM's scheme; on the one rank under ZBV); with pp == 1 the one
  matrix serves both.

Training state per local parameter (Micikevicius et al. 2018 mixed precision; Rajbhandari et al.
2020 ZeRO, Sec. 3 "K = 12"), as ``megasft.optim`` allocates it:

* weights in the model dtype (2 B bf16, 4 B fp32), re-pointed into one flat parameter buffer;
* one flat fp32 gradient buffer (each parameter's main grad a view of it), 4 B per parameter;
* optimizer state ``[3, shard]`` fp32 — master weight, Adam m and v — 12 B per owned parameter,
  in fp32 runs too (the master copy is kept regardless of the model dtype).

Each bucket of the flat buffers is padded to a multiple of ``shards * SHARD_ALIGN`` elements
(shards = dp * cp with the distributed optimizer, else 1: the cp ranks of a row hold the same
weights and reduce their gradients with the data-parallel ones) and each of those ranks owns an
equal 1/shards slice.
Without ``overlap_grad_reduce`` / ``overlap_param_gather`` there is one bucket, plus a last one for the parameters whose
gradients the model sums across ranks itself before the DP reduction (``ParamSpec.model_grad_sync``: the
pipeline-tied embedding copy, norm weights under SP, kv projections replicated when
tp > num_kv_heads), so the prediction is exact; with overlap the other parameters are cut into
~``bucket_size_mb`` buckets, each adding less than ``shards * SHARD_ALIGN`` elements more.

Mixture-of-experts layers (megasft.planner.moe) hold the replicated router [E, h] and, under expert
parallelism (parallel.ep), E/ep of the routed experts, each's FFN split over tp:
(E/ep) * 3*h*f_moe/tp expert weights per MoE layer, with their fp32 gradients beside them. Those
weights are held alike by the dp*cp / ep ranks of the expert data-parallel group only, so with
ep > 1 they sit in buckets of their own (``megasft.optim.grad_buffer``), padded for and sharded
over that many ranks (:func:`expert_zero_shards`): their optimizer state is 12 B / (dp*cp / ep)
per weight where the dense weights' is 12 B / (dp * cp). At ep = 1 they share the dense buckets.
Under sequence parallelism the router's gradient is summed over TP by the model (the last bucket).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megasft.config import Config, ModelConfig
from megasft.layout import kv_partition
from megasft.model.families import moe_ffn_size
from megasft.model.presets import norms_per_layer
from megasft.optim.grad_buffer import SHARD_ALIGN
from megasft.planner.moe import rank_expert_weights, rank_moe_layers, router_weights
from megasft.planner.pinned import layout_of

WEIGHT_BYTES = {"bf16": 2, "fp32": 4}
GRAD_BYTES = 4  # fp32 main gradients
OPTIMIZER_BYTES = 12  # fp32 master weight + Adam exp_avg + exp_avg_sq


def tp_layer_parameter_count(model: ModelConfig, tp: int, moe: bool = False, ep: int = 1) -> int:
    """Parameters of a decoder layer (a MoE layer with `moe`) held by one TP rank of an EP group of
    `ep` (see the module docstring for the split)."""
    h, d, f = model.hidden_size, model.head_size, model.intermediate_size
    q_width = model.num_attention_heads // tp * d
    kv_width = kv_partition(model.kv_heads, tp)[0] * d
    attention = h * q_width + 2 * h * kv_width + q_width * h
    if model.qkv_bias:
        attention += q_width + 2 * kv_width
    if model.qk_norm:
        attention += 2 * d  # q/k norm weights, replicated
    mlp = 3 * h * (f // tp)
    if moe:
        mlp = router_weights(model) + rank_expert_weights(model, tp, ep)
    return attention + mlp + norms_per_layer(model) * h  # the RMSNorm weights are replicated


@dataclass(frozen=True)
class RankParameters:
    """Parameters one rank holds, by where they come from."""

    layers: int
    """Decoder-layer parameters (all layers of this rank's chunks)."""
    embedding: int
    """Vocab-parallel embedding rows x hidden (first stage only)."""
    lm_head: int
    """Vocab-parallel LM head (the head's stage; the tied embedding copy when pp > 1)."""
    final_norm: int
    """Final RMSNorm weight (the head's stage only)."""
    experts: int = 0
    """Of ``layers``, the routed experts' weights (E/ep experts per MoE layer, each / tp)."""

    @property
    def total(self) -> int:
        return self.layers + self.embedding + self.lm_head + self.final_norm


def rank_parameters(cfg: Config, pp_rank: int) -> RankParameters:
    """Parameters held by any TP/DP rank of pipeline stage ``pp_rank`` (all TP ranks hold the same)."""
    m, p = cfg.model, cfg.parallel
    first, last = pp_rank == 0, pp_rank == layout_of(cfg).head_rank
    vocab_rows = m.padded_vocab_size(p.tp) // p.tp
    count, moe = sum(layout_of(cfg).rank_chunk_layers(pp_rank)), rank_moe_layers(cfg, pp_rank)
    layers = (count - moe) * tp_layer_parameter_count(m, p.tp)
    if moe:
        layers += moe * tp_layer_parameter_count(m, p.tp, moe=True, ep=p.ep)
    head_needed = last and (not m.tie_embeddings or p.pp > 1)
    return RankParameters(
        layers=layers,
        embedding=vocab_rows * m.hidden_size if first else 0,
        lm_head=vocab_rows * m.hidden_size if head_needed else 0,
        final_norm=m.hidden_size if last else 0,
        experts=moe * rank_expert_weights(m, p.tp, p.ep),
    )


def largest_parameter(cfg: Config, pp_rank: int) -> int:
    """Elements of the biggest single parameter on a rank of stage ``pp_rank`` (its .grad is
    materialised in the model dtype before the hook folds it into main_grad)."""
    m, p = cfg.model, cfg.parallel
    h = m.hidden_size
    moe = rank_moe_layers(cfg, pp_rank)
    sizes = [m.num_attention_heads // p.tp * m.head_size * h]
    if moe < sum(layout_of(cfg).rank_chunk_layers(pp_rank)):
        sizes.append(2 * (m.intermediate_size // p.tp) * h)          # a dense gate_up
    if moe:
        # the experts' stacked gate_up [E/ep * 2f/tp, h] (megasft.model.moe.RoutedExperts) and the router
        sizes += [m.num_experts // p.ep * 2 * (moe_ffn_size(m) // p.tp) * h, m.num_experts * h]
    params = rank_parameters(cfg, pp_rank)
    return max(sizes + [params.embedding, params.lm_head])


def model_synced_parameters(cfg: Config, pp_rank: int) -> int:
    """Elements on this stage whose gradients the model sums across ranks before the DP reduction
    (they sit in a gradient bucket of their own): the pipeline-tied embedding copy (summed over the
    embedding group), RMSNorm weights under SP and kv projections replicated when tp > kv heads
    (summed over their TP ranks, ``megasft.tensor_parallel.layers.mark_replicated``), and Qwen3's q/k
    norm weights at tp > 1 (each TP rank sees only its own heads); under SP also the MoE routers
    (each TP rank routes its s/tp tokens)."""
    m, layout = cfg.model, layout_of(cfg)
    params = rank_parameters(cfg, pp_rank)
    layers = sum(layout.rank_chunk_layers(pp_rank))
    synced = params.embedding + params.lm_head if m.tie_embeddings and layout.pp > 1 else 0
    if layout.sequence_parallel:
        synced += layers * norms_per_layer(m) * m.hidden_size + params.final_norm
        synced += rank_moe_layers(cfg, pp_rank) * router_weights(m)
    if m.qk_norm and layout.tp > 1:
        synced += layers * 2 * m.head_size   # q/k norm weights: partial over TP at every tp > 1
    if layout.kv_copies > 1:
        kv_width = layout.kv_heads_per_rank * m.head_size
        synced += layers * 2 * kv_width * (m.hidden_size + (1 if m.qkv_bias else 0))
    return synced


def zero_shards(cfg: Config) -> int:
    """Ranks that hold the same weights and reduce their gradients together: dp * cp."""
    layout = layout_of(cfg)
    return layout.dp * layout.cp


def expert_zero_shards(cfg: Config) -> int:
    """Ranks that hold the same routed experts: the expert data-parallel group, dp*cp / ep."""
    layout = layout_of(cfg)
    return layout.dp * layout.cp // cfg.parallel.ep


def buffer_numel(n: int, shards: int) -> int:
    """Elements of a flat buffer holding n parameters, padded so ``shards`` equal slices stay aligned."""
    multiple = shards * SHARD_ALIGN
    return math.ceil(n / multiple) * multiple


@dataclass(frozen=True)
class StateBytes:
    """Bytes of weights, gradients and optimizer state on one rank."""

    parameters: int
    """Local parameter count: ``sum(p.numel() for p in chunk.parameters())`` over the rank's chunks."""
    weights: int
    """``sum(p.numel() * p.element_size())``: the parameters in the model dtype."""
    grads: int
    """The fp32 gradient buffer (padded)."""
    optimizer: int
    """This rank's optimizer state: 3 fp32 tensors of its shard of the padded buffer."""

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def rank_state_bytes(cfg: Config, pp_rank: int = 0) -> StateBytes:
    """Weight, gradient and optimizer bytes on a rank of stage ``pp_rank`` (cfg validated, dp resolved).

    This is the planner's exact prediction to compare with a live rank's tensors: the model's
    parameters, ``GradBuffer.grad_data`` and ``DistributedOptimizer.state_bytes()``.
    """
    params = rank_parameters(cfg, pp_rank)
    n = params.total
    distributed = cfg.parallel.distributed_optimizer
    shards = zero_shards(cfg) if distributed else 1
    synced = model_synced_parameters(cfg, pp_rank)
    # ep > 1: the experts' own buckets (GradBuffer's split_experts), sharded over expert-DP.
    experts = params.experts if cfg.parallel.ep > 1 else 0
    expert_shards = expert_zero_shards(cfg) if distributed else 1
    dense = buffer_numel(n - synced - experts, shards) + (buffer_numel(synced, shards) if synced else 0)
    expert = buffer_numel(experts, expert_shards) if experts else 0
    return StateBytes(parameters=n, weights=n * WEIGHT_BYTES[cfg.train.precision],
                      grads=(dense + expert) * GRAD_BYTES,
                      optimizer=(dense // shards + expert // expert_shards) * OPTIMIZER_BYTES)
