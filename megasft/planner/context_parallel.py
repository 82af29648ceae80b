"""Context-parallel attention: the bytes a rank sends per layer for parallel.cp_comm = ring or
a2a, the buffers the exchange keeps in flight, and the part of it compute cannot hide.

Notation, one rank and one micro-batch: n = s*b/cp local tokens, d = head_dim, a_t = query heads
and k_t = kv heads per TP rank (megasft.layout.kv_partition: one replicated head when tp > kv
heads), e = bytes of a model-dtype element, g = bytes of a dK/dV element on the ring
(``RING_GRAD_BYTES``). One K (or V) block is [s/cp, b, k_t, d]: ``n*k_t*d*e`` bytes.

ring (Liu et al. 2023, "Ring Attention"; Megatron-Core's p2p context parallelism): the K/V blocks
go round the cp ranks in cp-1 steps; in each step a rank attends its queries to the block it holds
while the next one arrives. Per layer and micro-batch a rank sends

    forward    (cp-1) * 2 * n*k_t*d*e    = 2(cp-1)/cp * s*b*k_t*d*e: (cp-1)/cp of the layer's
                                           full K and V (every rank receives every block but its own)
    backward   (cp-1) * 2 * n*k_t*d*e    K and V go round again (only the local block is saved)
             + cp * 2 * n*k_t*d*g        the dK/dV partial sums travel with them, one hop a step,
                                           and a last hop brings them to the block's owner

a2a (Jacobs et al. 2023, "DeepSpeed Ulysses"): all-to-alls turn the sequence shard into a head
shard for the attention core and back; each sends (cp-1)/cp of its local tensor:

    forward    q, k, v, out              (cp-1)/cp * n*d*e * (2*a_t + 2*k_a)
    backward   d_out, dq, dk, dv         the same bytes (gradients in the model dtype)

with k_a = k_t when cp divides k_t, else lcm(k_t, cp): kv heads repeated so that every rank's
query heads find theirs after the exchange (:func:`a2a_kv_heads`). a2a needs cp to divide a_t
(megasft.layout._check_cp).

Recomputation reruns the forward exchange: model.recompute=selective checkpoints the attention core,
which under CP is the whole CP attention, exchange included; full reruns the layer. torch's
checkpoint stops recomputing once backward has what it needs, so under selective a2a skips the
output's all-to-all (megasft.context_parallel.volume.recompute_bytes).

Time. With load-balanced chunks every one of a rank's cp ring steps is 1/cp of its attention
(megasft.context_parallel.sharding: each step pairs 2 of the rank's 2*cp chunk-units), and the
transfer of the next block runs under it, so a layer's exposed ring time is

    forward    (cp-1) * max(0, t_kv - A/cp)             t_kv  = latency + 2*n*k_t*d*e / bw
    backward   (cp-1) * max(0, t_kv + t_dkv - 2A/cp)    t_dkv = 2*n*k_t*d*g / bw

with A the layer's forward attention time on the rank (backward costs two forwards, as in
megasft.planner.flops). A rank sends to one neighbour while receiving from the other, so a step
costs the bytes sent once (full-duplex links). The all-to-alls sit between the q/k/v projections
and the core and between the core and o_proj: nothing hides them, 8 per layer (12 with
recomputation) at latency + bytes / bw each. bw is the bus bandwidth of a group spanning tp*cp
consecutive ranks (ranks are laid out TP fastest, then CP).

The ring also costs memory traffic the unsplit attention does not have: every step's partial
result is merged into fp32 accumulators (online softmax rescaling; Liu et al. 2023, Sec. 3). Per
layer a rank reads the accumulator, the step's partial and writes the accumulator back, cp times:

    forward    cp * n*a_t*d * (4 + e + 4)             the output, [s/cp, b, a_t, d]
    backward   cp * n*(a_t + 2*k_t)*d * (4 + e + 4)   dQ, and the travelling dK/dV sums

(:func:`ring_merge_bytes`), timed as memory-bound work at HBM bandwidth like the other elementwise
passes (megasft.planner.estimate). It grows with cp per rank, so it is what makes an ever larger cp
stop paying once the activations fit. Not modelled: flash kernels on short blocks (a few hundred
tokens) run below ``Assumptions.attention_efficiency``, so for short rows split many ways the
estimate is optimistic.

Which is cheaper (:func:`preferred_cp_comm`): per local token the ring moves 2(cp-1)*k_t heads
forward, a2a (cp-1)/cp*(2*a_t + 2*k_a) — fewer bytes for a2a once cp*k_t > a_t + k_a (many kv
heads, large cp) — but the ring hides behind the block attention, which dominates long rows; a2a
wins where ring steps are too short to hide their latency or bytes (short rows, large cp, MHA on
slow links). The planner compares the two exposed times; ``--search`` ranks both layouts.
"""
from __future__ import annotations

import math

from megasft.config import Config
from megasft.context_parallel.volume import ACCUMULATOR_BYTES, attention_bytes, recompute_bytes
from megasft.planner.activations import ELEMENT_BYTES, FP32_BYTES, local_tokens
from megasft.planner.assumptions import Assumptions
from megasft.planner.flops import layer_attention_flops
from megasft.planner.hardware import Cluster
from megasft.planner.pinned import layout_of

RING, A2A = "ring", "a2a"
RING_GRAD_BYTES = ACCUMULATOR_BYTES
"""Bytes of a dK/dV element sent round the ring in backward: the runtime's fp32 accumulators."""


def a2a_kv_heads(kv_heads: int, cp: int) -> int:
    """K/V heads per TP rank that take part in the all-to-all: k_t when cp divides it, else
    lcm(k_t, cp) (each head repeated so the exchange hands every rank whole heads)."""
    return kv_heads if kv_heads % cp == 0 else math.lcm(kv_heads, cp)


def a2a_possible(cfg: Config) -> bool:
    """The all-to-all exchange scatters each TP rank's query heads over cp ranks: cp must divide them."""
    return (cfg.model.num_attention_heads // cfg.parallel.tp) % cfg.parallel.cp == 0


def kv_block_bytes(cfg: Config, element_bytes: int | None = None) -> float:
    """One K (or V) block of one rank, [s/cp, b, k_t, d], in the model dtype or ``element_bytes``."""
    e = ELEMENT_BYTES[cfg.train.precision] if element_bytes is None else element_bytes
    return float(local_tokens(cfg) * layout_of(cfg).kv_heads_per_rank * cfg.model.head_size * e)


def layer_bytes(cfg: Config, comm: str | None = None, grad_bytes: int = RING_GRAD_BYTES) -> tuple[float, float]:
    """(forward, backward) bytes one rank sends over the CP group per layer and micro-batch
    (formulas in the module docstring); ``comm`` defaults to the config's parallel.cp_comm."""
    cp = cfg.parallel.cp
    if cp == 1:
        return 0.0, 0.0
    comm = comm or cfg.parallel.cp_comm
    m, layout = cfg.model, layout_of(cfg)
    # The runtime's own volume model (what the ledger books), on this rank's shapes.
    forward, backward = attention_bytes(comm, cp, local_tokens(cfg), m.num_attention_heads // layout.tp,
                                        layout.kv_heads_per_rank, m.head_size, ELEMENT_BYTES[cfg.train.precision])
    if comm == RING and grad_bytes != ACCUMULATOR_BYTES:   # what-if: dK/dV sent in another dtype
        backward += layout.cp * 2 * kv_block_bytes(cfg, grad_bytes) - layout.cp * 2 * kv_block_bytes(cfg, ACCUMULATOR_BYTES)
    return forward, backward


def exchanges_per_layer(cfg: Config, comm: str) -> tuple[int, int]:
    """(forward, backward) exchanges per layer: ring steps or all-to-alls."""
    return (cfg.parallel.cp - 1,) * 2 if comm == RING else (2, 2) if comm == "allgather" else (4, 4)


def _forwards(cfg: Config) -> int:
    """Forward exchanges per micro-batch: 1, or 2 when recomputation reruns the attention."""
    return 1 if cfg.model.recompute == "none" else 2


def cp_bytes_per_micro_batch(cfg: Config, pp_rank: int, grad_bytes: int = RING_GRAD_BYTES) -> float:
    """CP bytes one rank of stage ``pp_rank`` sends per micro-batch (forward, recompute, backward)."""
    forward, backward = layer_bytes(cfg, grad_bytes=grad_bytes)
    m, layout = cfg.model, layout_of(cfg)
    again = recompute_bytes(layout.cp_comm, layout.cp, local_tokens(cfg), m.num_attention_heads // layout.tp,
                            layout.kv_heads_per_rank, m.head_size, ELEMENT_BYTES[cfg.train.precision], m.recompute)
    return sum(layout.rank_chunk_layers(pp_rank)) * (forward + again + backward)


def cp_bandwidth(cfg: Config, cluster: Cluster) -> float:
    """Bus bandwidth (bytes/s) of a CP group: cp ranks spaced tp apart."""
    return cluster.group_bandwidth(cfg.parallel.tp * cfg.parallel.cp)


def cp_exposed_seconds(cfg: Config, cluster: Cluster, pp_rank: int, assumptions: Assumptions,
                       comm: str | None = None, grad_bytes: int = RING_GRAD_BYTES) -> float:
    """CP communication time per micro-batch that the rank's compute does not hide (module docstring)."""
    cp = cfg.parallel.cp
    if cp == 1:
        return 0.0
    comm = comm or cfg.parallel.cp_comm
    bw, latency = cp_bandwidth(cfg, cluster), assumptions.cp_latency_us * 1e-6
    forward, backward = layer_bytes(cfg, comm, grad_bytes)
    steps_f, steps_b = exchanges_per_layer(cfg, comm)
    layers = [i for chunk in layout_of(cfg).rank_chunks(pp_rank) for i in chunk]
    if comm != RING:   # all-to-alls / all-gathers sit between the projections and the core
        per_layer = _forwards(cfg) * (steps_f * latency + forward / bw) + steps_b * latency + backward / bw
        return len(layers) * per_layer
    rate = cluster.gpu.peak_tflops * 1e12 * assumptions.attention_efficiency
    t_fwd, t_bwd = latency + forward / steps_f / bw, latency + backward / steps_b / bw   # one ring step
    exposed = 0.0
    for layer in layers:
        step = layer_attention_flops(cfg, layer, assumptions.causal_attention) / rate / cp
        exposed += (cp - 1) * (_forwards(cfg) * max(0.0, t_fwd - step) + max(0.0, t_bwd - 2 * step))
    return exposed


def preferred_cp_comm(cfg: Config, cluster: Cluster, pp_rank: int, assumptions: Assumptions) -> str:
    """The exchange with less exposed time on this rank (ring when a2a is impossible or they tie)."""
    if cfg.parallel.cp == 1 or not a2a_possible(cfg):
        return RING
    ring = cp_exposed_seconds(cfg, cluster, pp_rank, assumptions, RING)
    return A2A if cp_exposed_seconds(cfg, cluster, pp_rank, assumptions, A2A) < ring else RING


def cp_transient_bytes(cfg: Config, grad_bytes: int = RING_GRAD_BYTES) -> float:
    """Buffers the exchange holds while one layer's attention runs (on top of the saved activations).

    ring, at its backward peak: the K/V block being used and the one arriving (2 x K and V), the
    same two of the travelling dK/dV sums (grad_bytes), and the fp32 dQ accumulator [s/cp, b, a_t, d].
    a2a: the contiguous send copy of the largest exchanged tensor (the all-to-all's output is the
    saved activation itself).
    """
    layout = layout_of(cfg)
    if layout.cp == 1:
        return 0.0
    m, n = cfg.model, local_tokens(cfg)
    q_heads = m.num_attention_heads // layout.tp
    if layout.cp_comm == RING:
        in_flight = 2 * 2 * (kv_block_bytes(cfg) + kv_block_bytes(cfg, grad_bytes))
        return in_flight + n * q_heads * m.head_size * FP32_BYTES
    heads = max(q_heads, a2a_kv_heads(layout.kv_heads_per_rank, layout.cp))
    return float(n * heads * m.head_size * ELEMENT_BYTES[cfg.train.precision])


def ring_merge_bytes(cfg: Config) -> float:
    """HBM bytes one rank moves per layer and micro-batch merging the ring's partial results into
    fp32 accumulators (module docstring); 0 without CP or with the all-to-all exchange, whose
    attention core runs unsplit."""
    layout = layout_of(cfg)
    if layout.cp == 1 or layout.cp_comm != RING:
        return 0.0
    m, n, e = cfg.model, local_tokens(cfg), ELEMENT_BYTES[cfg.train.precision]
    q_heads = m.num_attention_heads // layout.tp
    per_element = 2 * FP32_BYTES + e
    forward = layout.cp * n * q_heads * m.head_size * per_element
    backward = layout.cp * n * (q_heads + 2 * layout.kv_heads_per_rank) * m.head_size * per_element
    return _forwards(cfg) * forward + backward
