"""Communication volume and time per rank: TP collectives, pipeline p2p, data-parallel ZeRO-1.

Ring collectives over n ranks move (n-1)/n of the full tensor per rank for an all-gather or a
reduce-scatter and twice that for an all-reduce (Patarasuk & Yuan 2009; NCCL's "bus bandwidth"
is defined so that time = these bytes / busbw). Latency terms are ignored: every message here is
megabytes or more.

* TP (Shoeybi et al. 2019 Sec. 3; Korthikanti et al. 2022 Sec. 4.2.2): per layer, forward runs two
  all-reduces of the [s, b, h] activation (attention and MLP output), or with SP two all-gathers
  plus two reduce-scatters — the same bytes; backward mirrors them. Full recomputation repeats the
  forward's. The vocab-parallel embedding and LM head add one collective pair each. All TP traffic
  sits on the critical path (megasft does not overlap it with GEMMs).
  The last stage's vocab-parallel cross-entropy all-reduces three fp32 statistics per token (max,
  target logit, sum of exponentials); replicated parameters whose gradients are partial per TP
  rank (norms under SP, Qwen3's q/k norms, kv projections replicated when tp > kv heads) sum
  their fp32 gradients once per step.
* PP: each micro-batch crossing a chunk boundary sends its activation forward and its gradient
  backward, [s, b, h] (or [s/t, b, h] under SP, where activations between layers are sharded).
  A rank sends one message per boundary of its chunks with another rank (the model's first chunk
  sends no gradient, its last no activation, and ZBV's turn of the V on the last stage stays
  local); the link time counts send and receive, 2 messages per chunk.
* Tied embeddings under PP: the first and last stage all-reduce the embedding's fp32 gradient
  (ZBV: both copies are on the first stage, summed locally).
* CP (parallel.cp > 1): the ring's K/V and dK/dV blocks or the all-to-alls of q/k/v/out, per layer
  (formulas, overlap and the ring-or-a2a rule in ``megasft.planner.context_parallel``). CP also
  shrinks everything else per rank: TP collectives, pipeline messages and the loss run on s/cp
  tokens of each row.
* EP (parallel.ep > 1, mixture-of-experts): per MoE layer and micro-batch the token dispatch and
  combine all-to-alls over the ep ranks of an EP group, forward and backward (and the forward's
  again under full recompute) — :func:`megasft.planner.moe.alltoall_bytes`, uniform routing. They
  sit between the router and the experts and between the experts and the weighted sum: nothing
  hides them (``Assumptions.ep_latency_us`` per call plus bytes / bandwidth of a group spanning
  ep*cp*tp consecutive ranks). A MoE layer's TP traffic adds, beside the dense MLP's pair, its
  routing weights [s, b, k] entering the TP region (and under SP the all-gather of the int64
  expert ids); under SP the router's gradient is summed over TP like the norms'.
* DP with the distributed optimizer (ZeRO-1; Rajbhandari et al. 2020): reduce-scatter of the fp32
  gradients, then all-gather of the updated bf16 weights — 1.5x the bytes of a bf16 all-reduce.
  The group is the dp*cp ranks holding the same weights (a row's cp ranks each hold part of its
  gradient), laid out over tp*cp*dp consecutive ranks.
  Routed experts under ep > 1 are reduced and gathered over their expert data-parallel group of
  dp*cp/ep ranks instead (megasft.parallel_state; the ledger books it as "dp" too), whose members
  are ep of the dp x cp ranks apart.
  Without it: an fp32 all-reduce. ``overlap_grad_reduce`` runs the reduction bucket by bucket
  during the last micro-batch's backward, ``overlap_param_gather`` the all-gather during the next
  step's first forward; what the compute cannot hide (at least one bucket each) stays exposed —
  see ``megasft.planner.estimate``.
"""
from __future__ import annotations

from dataclasses import dataclass

from megasft.config import Config
from megasft.layout import chunk_ranks
from megasft.planner.activations import ELEMENT_BYTES, INDEX_BYTES, local_tokens
from megasft.planner.assumptions import Assumptions
from megasft.planner.context_parallel import cp_bytes_per_micro_batch, cp_exposed_seconds
from megasft.planner.hardware import Cluster
from megasft.planner.memory import GRAD_BYTES, WEIGHT_BYTES, expert_zero_shards, rank_parameters, zero_shards
from megasft.planner.moe import alltoall_bytes, alltoall_calls, pooled_stats_bytes, rank_moe_layers, router_weights
from megasft.planner.pinned import layout_of


def ring_fraction(n: int) -> float:
    """Share of a tensor each rank sends in a ring all-gather or reduce-scatter over n ranks."""
    return (n - 1) / n


@dataclass(frozen=True)
class RankComm:
    """Bytes one rank sends per optimizer step, and the part of the step they cost."""

    tp_bytes: float
    pp_bytes: float
    dp_bytes: float
    """Gradient reduction and weight gathering, dense weights over dp*cp and experts over expert-DP."""
    cp_bytes: float
    ep_bytes: float
    """Expert-parallel token all-to-alls."""
    tp_seconds_per_micro_batch: float
    """TP collective time inside one micro-batch's forward+backward on this rank."""
    cp_seconds_per_micro_batch: float
    """Context-parallel exchange time per micro-batch that compute does not hide (ring steps
    beyond their block attention, or every all-to-all)."""
    pp_seconds_per_micro_batch: float
    """Pipeline send/recv time per micro-batch (all chunks of this rank), before overlap."""
    ep_seconds_per_micro_batch: float
    """Expert-parallel all-to-all time per micro-batch (none of it hidden)."""
    dp_reduce_seconds: float
    """Gradient reduce-scatter (or all-reduce) over DP, once per step."""
    dp_gather_seconds: float
    """All-gather of the updated weights over DP (ZeRO-1), once per step."""
    dp_bucket_seconds: float
    """Reduction time of one gradient bucket: the part overlap can never hide."""
    dp_gather_bucket_seconds: float
    """All-gather time of one bucket's weights: the part overlap_param_gather can never hide."""


def tp_bytes_per_micro_batch(cfg: Config, pp_rank: int) -> float:
    """TP collective bytes one rank sends per micro-batch (forward, recompute and backward)."""
    m, p = cfg.model, cfg.parallel
    if p.tp == 1:
        return 0.0
    tokens = local_tokens(cfg)
    activation = tokens * m.hidden_size * ELEMENT_BYTES[cfg.train.precision]
    unit = ring_fraction(p.tp) * activation  # one all-gather or one reduce-scatter
    per_layer = (4 + 4 + (4 if m.recompute == "full" else 0)) * unit  # forward, backward, recompute
    head = pp_rank == layout_of(cfg).head_rank
    ends = (pp_rank == 0) + head  # embedding / LM head collective pairs
    # Vocab-parallel cross-entropy: all-reduces of the fp32 max, target logit and sum-exp per token.
    loss_stats = 3 * 2 * ring_fraction(p.tp) * tokens * 4 if head else 0
    routing = rank_moe_layers(cfg, pp_rank) * moe_routing_tp_bytes(cfg)
    return sum(layout_of(cfg).rank_chunk_layers(pp_rank)) * per_layer + ends * 2 * unit + loss_stats + routing


def moe_routing_tp_bytes(cfg: Config) -> float:
    """TP bytes one MoE layer adds per micro-batch: its routing weights [s, b, k] enter the TP region
    (megasft.model.moe.MoE) — under SP an all-gather forward and a reduce-scatter of their gradient
    backward, plus the all-gather of the int64 expert ids; without SP an all-reduce of the gradient
    backward — the forward's part again under full recompute."""
    m, p = cfg.model, cfg.parallel
    e, k = ELEMENT_BYTES[cfg.train.precision], m.moe_top_k
    unit = ring_fraction(p.tp) * local_tokens(cfg) * k                # one gather or scatter, per element byte
    if layout_of(cfg).sequence_parallel:
        forward = unit * (e + INDEX_BYTES)
        return forward * (2 if m.recompute == "full" else 1) + unit * e
    return 2 * unit * e


def tp_grad_sync_bytes(cfg: Config, pp_rank: int) -> float:
    """Bytes one rank sends per step summing the partial fp32 gradients of replicated parameters
    (megasft.tensor_parallel.layers.sync_replicated_grads): norms under SP and Qwen3's q/k norms
    over TP, kv projections over the ranks sharing a kv head."""
    m, layout = cfg.model, layout_of(cfg)
    layers = sum(layout.rank_chunk_layers(pp_rank))
    over_tp = layers * 2 * m.hidden_size + (m.hidden_size if pp_rank == layout.head_rank else 0) \
        if layout.sequence_parallel else 0
    if layout.sequence_parallel:
        over_tp += rank_moe_layers(cfg, pp_rank) * router_weights(m)
    if m.qk_norm:
        over_tp += layers * 2 * m.head_size
    total = 2 * ring_fraction(layout.tp) * over_tp * GRAD_BYTES if layout.tp > 1 else 0.0
    if layout.kv_copies > 1:
        kv = layers * 2 * layout.kv_heads_per_rank * m.head_size * (m.hidden_size + (1 if m.qkv_bias else 0))
        total += 2 * ring_fraction(layout.kv_copies) * kv * GRAD_BYTES
    return total


def pp_messages_per_micro_batch(cfg: Config, pp_rank: int) -> int:
    """Messages one rank of stage ``pp_rank`` sends per micro-batch: an activation from every chunk
    but the model's last, a gradient from every chunk but the model's first — where the chunk next
    to it is on another rank."""
    layout = layout_of(cfg)
    if layout.pp == 1:
        return 0
    ranks = chunk_ranks(layout.schedule, layout.pp, layout.v)
    mine = layout.rank_chunk_ids(pp_rank)
    return sum(c + 1 < len(ranks) and ranks[c + 1] != pp_rank for c in mine) + \
        sum(c > 0 and ranks[c - 1] != pp_rank for c in mine)


def tied_embedding_bytes(cfg: Config, pp_rank: int) -> float:
    """Bytes a first/last-stage rank sends per step all-reducing the tied embedding's gradient."""
    m, p, head = cfg.model, cfg.parallel, layout_of(cfg).head_rank
    if not m.tie_embeddings or p.pp == 1 or head == 0 or pp_rank not in (0, head):
        return 0.0
    return 2 * ring_fraction(2) * m.padded_vocab_size(p.tp) // p.tp * m.hidden_size * GRAD_BYTES


def pp_message_bytes(cfg: Config) -> float:
    """One activation (or its gradient) between pipeline stages: [s/cp(/tp under SP), b, h]."""
    m, p = cfg.model, cfg.parallel
    shard = p.tp if layout_of(cfg).sequence_parallel else 1
    return local_tokens(cfg) * m.hidden_size * ELEMENT_BYTES[cfg.train.precision] / shard


def pp_bytes_per_micro_batch(cfg: Config) -> float:
    """Pipeline bytes through one rank's links per micro-batch (sent + received, the link time's
    basis): activation forward + gradient backward per chunk."""
    if cfg.parallel.pp == 1:
        return 0.0
    return 2 * cfg.parallel.virtual_pipeline_size * pp_message_bytes(cfg)


def predicted_bytes(cfg: Config, pp_rank: int) -> dict[str, float]:
    """Bytes one rank of stage ``pp_rank`` sends per optimizer step, by group kind — the quantity
    the communication ledger (megasft.collectives) measures (its scalar all-reduces of losses,
    counts and norms are left out: a few bytes). "pp" is the p2p messages plus, for a MoE model,
    its router statistics pooled over the stages per micro-batch (megasft.planner.moe.pooled_stats_bytes);
    "cp" is the context-parallel exchange (ring sends or all-to-all bytes to other ranks,
    megasft.planner.context_parallel); the gradient
    reduction over the dp*cp ranks is booked as "dp", and so is the experts' over expert-DP; "ep"
    is the expert-parallel all-to-all."""
    m = layout_of(cfg).micro_batches
    reduce_bytes, gather_bytes = dp_bytes_per_step(cfg, pp_rank)
    return {"tp": tp_bytes_per_micro_batch(cfg, pp_rank) * m + tp_grad_sync_bytes(cfg, pp_rank),
            "pp": (pp_messages_per_micro_batch(cfg, pp_rank) * pp_message_bytes(cfg) + pooled_stats_bytes(cfg)) * m,
            "cp": cp_bytes_per_micro_batch(cfg, pp_rank) * m,
            "dp": reduce_bytes + gather_bytes + sum(expert_dp_bytes_per_step(cfg, pp_rank)),
            "ep": ep_bytes_per_micro_batch(cfg, pp_rank) * m,
            "embedding": tied_embedding_bytes(cfg, pp_rank)}


def ep_bytes_per_micro_batch(cfg: Config, pp_rank: int) -> float:
    """Expert-parallel all-to-all bytes one rank sends per micro-batch over its MoE layers."""
    m, p = cfg.model, cfg.parallel
    return rank_moe_layers(cfg, pp_rank) * alltoall_bytes(local_tokens(cfg), m.moe_top_k, m.hidden_size, m.num_experts, p.ep,
                                        ELEMENT_BYTES[cfg.train.precision], m.recompute == "full")


def _zero1_bytes(cfg: Config, n: int, ranks: int) -> tuple[float, float]:
    """(gradient reduction, weight all-gather) bytes for n parameters held alike by `ranks` ranks."""
    if ranks == 1:
        return 0.0, 0.0
    if cfg.parallel.distributed_optimizer:
        return ring_fraction(ranks) * n * GRAD_BYTES, ring_fraction(ranks) * n * WEIGHT_BYTES[cfg.train.precision]
    return 2 * ring_fraction(ranks) * n * GRAD_BYTES, 0.0


def _split_experts(cfg: Config, pp_rank: int) -> int:
    """Routed-expert weights reduced over expert-DP rather than dp*cp (none at ep = 1)."""
    return rank_parameters(cfg, pp_rank).experts if cfg.parallel.ep > 1 else 0


def dp_bytes_per_step(cfg: Config, pp_rank: int) -> tuple[float, float]:
    """(gradient reduction bytes, weight all-gather bytes) one rank sends per step over dp*cp ranks
    (every weight but the experts of an ep > 1 layout)."""
    n = rank_parameters(cfg, pp_rank).total - _split_experts(cfg, pp_rank)
    return _zero1_bytes(cfg, n, zero_shards(cfg))


def expert_dp_bytes_per_step(cfg: Config, pp_rank: int) -> tuple[float, float]:
    """The same for the routed experts of an ep > 1 layout, over their dp*cp/ep expert-DP ranks."""
    return _zero1_bytes(cfg, _split_experts(cfg, pp_rank), expert_zero_shards(cfg))


def rank_comm(cfg: Config, cluster: Cluster, pp_rank: int, assumptions: Assumptions = Assumptions()) -> RankComm:
    """Communication of a rank of stage ``pp_rank`` on ``cluster`` (cfg validated, dp resolved)."""
    p = cfg.parallel
    dp = zero_shards(cfg)
    tp_mb = tp_bytes_per_micro_batch(cfg, pp_rank)
    pp_mb = pp_bytes_per_micro_batch(cfg)
    reduce_bytes, gather_bytes = dp_bytes_per_step(cfg, pp_rank)
    expert_reduce, expert_gather = expert_dp_bytes_per_step(cfg, pp_rank)
    # TP groups are tp consecutive ranks, the dp*cp gradient groups span dp*cp*tp ranks, an EP group
    # (ep consecutive dp x cp ranks) ep*tp, an expert-DP group (every ep-th of them)
    # (dp*cp - ep + 1)*tp, a PP group the world.
    tp_bw = cluster.group_bandwidth(p.tp)
    dp_bw = cluster.group_bandwidth(dp * p.tp)
    ep_bw = cluster.group_bandwidth(p.ep * p.tp)
    expert_bw = cluster.group_bandwidth((dp - p.ep + 1) * p.tp)
    pp_bw = cluster.group_bandwidth(cluster.world_size)
    reduce_s = reduce_bytes / dp_bw + expert_reduce / expert_bw
    gather_s = gather_bytes / dp_bw + expert_gather / expert_bw
    bucket = p.bucket_size_mb * 2**20 * ring_fraction(dp) / dp_bw   # fp32 gradient bytes per bucket
    sent = predicted_bytes(cfg, pp_rank)
    moe_layers = rank_moe_layers(cfg, pp_rank) if p.ep > 1 else 0
    ep_latency = moe_layers * alltoall_calls(cfg.model.recompute == "full") * assumptions.ep_latency_us * 1e-6
    return RankComm(
        tp_bytes=sent["tp"],
        pp_bytes=sent["pp"],
        dp_bytes=sent["dp"],
        cp_bytes=sent["cp"],
        ep_bytes=sent["ep"],
        tp_seconds_per_micro_batch=tp_mb / tp_bw,
        cp_seconds_per_micro_batch=cp_exposed_seconds(cfg, cluster, pp_rank, assumptions),
        pp_seconds_per_micro_batch=pp_mb / pp_bw,
        ep_seconds_per_micro_batch=ep_latency + ep_bytes_per_micro_batch(cfg, pp_rank) / ep_bw,
        dp_reduce_seconds=reduce_s,
        dp_gather_seconds=gather_s,
        dp_bucket_seconds=min(reduce_s, bucket),
        dp_gather_bucket_seconds=min(gather_s, bucket * WEIGHT_BYTES[cfg.train.precision] / GRAD_BYTES),
    )
