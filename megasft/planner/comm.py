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
* PP: each micro-batch crossing a chunk boundary sends its activation forward and its gradient
  backward, [s, b, h] (or [s/t, b, h] under SP, where activations between layers are sharded).
* DP with the distributed optimizer (ZeRO-1; Rajbhandari et al. 2020): reduce-scatter of the fp32
  gradients, then all-gather of the updated bf16 weights — 1.5x the bytes of a bf16 all-reduce.
  Without it: an fp32 all-reduce. ``overlap_grad_reduce`` runs the reduction bucket by bucket
  during the last micro-batch's backward, ``overlap_param_gather`` the all-gather during the next
  step's first forward; what the compute cannot hide (at least one bucket each) stays exposed —
  see ``megasft.planner.estimate``.
"""
from __future__ import annotations

from dataclasses import dataclass

from megasft.config import Config
from megasft.planner.activations import ELEMENT_BYTES
from megasft.planner.hardware import Cluster
from megasft.planner.memory import GRAD_BYTES, WEIGHT_BYTES, rank_parameters
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
    tp_seconds_per_micro_batch: float
    """TP collective time inside one micro-batch's forward+backward on this rank."""
    pp_seconds_per_micro_batch: float
    """Pipeline send/recv time per micro-batch (all chunks of this rank), before overlap."""
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
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if p.tp == 1:
        return 0.0
    activation = d.seq_len * d.micro_batch_size * m.hidden_size * ELEMENT_BYTES[cfg.train.precision]
    unit = ring_fraction(p.tp) * activation  # one all-gather or one reduce-scatter
    per_layer = (4 + 4 + (4 if m.recompute == "full" else 0)) * unit  # forward, backward, recompute
    ends = (pp_rank == 0) + (pp_rank == p.pp - 1)  # embedding / LM head collective pairs
    return sum(layout_of(cfg).rank_chunk_layers(pp_rank)) * per_layer + ends * 2 * unit


def pp_bytes_per_micro_batch(cfg: Config) -> float:
    """Pipeline bytes one rank sends per micro-batch: activation forward + gradient backward per chunk."""
    m, p, d = cfg.model, cfg.parallel, cfg.data
    if p.pp == 1:
        return 0.0
    shard = p.tp if layout_of(cfg).sequence_parallel else 1
    message = d.seq_len * d.micro_batch_size * m.hidden_size * ELEMENT_BYTES[cfg.train.precision] / shard
    return 2 * p.virtual_pipeline_size * message


def dp_bytes_per_step(cfg: Config, pp_rank: int) -> tuple[float, float]:
    """(gradient reduction bytes, weight all-gather bytes) one rank sends per step."""
    p, dp = cfg.parallel, layout_of(cfg).dp
    if dp == 1:
        return 0.0, 0.0
    n = rank_parameters(cfg, pp_rank).total
    if p.distributed_optimizer:
        return ring_fraction(dp) * n * GRAD_BYTES, ring_fraction(dp) * n * WEIGHT_BYTES[cfg.train.precision]
    return 2 * ring_fraction(dp) * n * GRAD_BYTES, 0.0


def rank_comm(cfg: Config, cluster: Cluster, pp_rank: int) -> RankComm:
    """Communication of a rank of stage ``pp_rank`` on ``cluster`` (cfg validated, dp resolved)."""
    p, layout = cfg.parallel, layout_of(cfg)
    dp, m = layout.dp, layout.micro_batches
    tp_mb = tp_bytes_per_micro_batch(cfg, pp_rank)
    pp_mb = pp_bytes_per_micro_batch(cfg)
    reduce_bytes, gather_bytes = dp_bytes_per_step(cfg, pp_rank)
    # TP groups are tp consecutive ranks, DP groups span dp*tp ranks, a PP group spans the world.
    tp_bw = cluster.group_bandwidth(p.tp)
    dp_bw = cluster.group_bandwidth(dp * p.tp)
    pp_bw = cluster.group_bandwidth(cluster.world_size)
    reduce_s, gather_s = reduce_bytes / dp_bw, gather_bytes / dp_bw
    bucket = p.bucket_size_mb * 2**20 * ring_fraction(dp) / dp_bw   # fp32 gradient bytes per bucket
    return RankComm(
        tp_bytes=tp_mb * m,
        pp_bytes=pp_mb * m,
        dp_bytes=reduce_bytes + gather_bytes,
        tp_seconds_per_micro_batch=tp_mb / tp_bw,
        pp_seconds_per_micro_batch=pp_mb / pp_bw,
        dp_reduce_seconds=reduce_s,
        dp_gather_seconds=gather_s,
        dp_bucket_seconds=min(reduce_s, bucket),
        dp_gather_bucket_seconds=min(gather_s, bucket * WEIGHT_BYTES[cfg.train.precision] / GRAD_BYTES),
    )
