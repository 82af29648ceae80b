"""Bytes one CP rank sends in one attention call, per direction, from the shapes alone — what the
communication ledger books under kind "cp" (megasft.collectives), for the planner and the tests.

  ring  forward  (cp-1) hops of this rank's K and V                     (cp-1) * 2 t nkv d * e
        backward (cp-1) hops of K and V again, and cp hops of the fp32
                 dK/dV accumulators (the last one brings them home)     + cp * 2 t nkv d * 4
  a2a   forward  q, k, v out and the output back, each all-to-all
                 sending (cp-1)/cp of its input                         (cp-1)/cp * t d (2 nq + 2 nkv f) * e
        backward the same all-to-alls on the gradients, reversed        the same
  allgather  forward  all-gather of K and V                             (cp-1) * 2 t nkv d * e
             backward reduce-scatter of dK and dV                       the same

t is the rank's tokens (b * s / cp), nq / nkv its heads (after TP), e the activations' element
size, f = kv_repeats(nkv, cp) the kv-head repetition the a2a path needs when cp does not divide nkv.
"""
from __future__ import annotations

from megasft.context_parallel.ulysses import kv_repeats

ACCUMULATOR_BYTES = 4   # the ring's dK/dV accumulators are fp32


def attention_bytes(comm: str, cp: int, tokens: int, nq: int, nkv: int, head_dim: int,
                    element_bytes: int) -> tuple[float, float]:
    """(forward, backward) bytes this rank sends over the CP group in one attention call."""
    if cp == 1:
        return 0.0, 0.0
    if comm == "ring":
        kv = 2 * tokens * nkv * head_dim
        forward = (cp - 1) * kv * element_bytes
        return float(forward), float(forward + cp * kv * ACCUMULATOR_BYTES)
    if comm == "a2a":
        heads = 2 * nq + 2 * nkv * kv_repeats(nkv, cp)
        volume = (cp - 1) / cp * tokens * head_dim * heads * element_bytes
        return volume, volume
    if comm == "allgather":
        volume = float((cp - 1) * 2 * tokens * nkv * head_dim * element_bytes)
        return volume, volume
    raise ValueError(f"cp_comm {comm!r} is not one of ('ring', 'a2a', 'allgather')")


def recompute_bytes(comm: str, cp: int, tokens: int, nq: int, nkv: int, head_dim: int, element_bytes: int,
                    recompute: str) -> float:
    """Bytes the backward's recomputation resends (model.recompute). torch's non-reentrant
    checkpoint stops recomputing once every tensor backward needs is back, so under `selective`
    (the attention core checkpointed) a2a does not resend the output's all-to-all — nothing
    saved comes after it — while the ring reruns whole (its output and lse are what it saves) and
    all-gather regathers K/V; `full` (the layer checkpointed) reruns every exchange, since o_proj
    needs the core's output."""
    if recompute == "none" or cp == 1:
        return 0.0
    forward, _ = attention_bytes(comm, cp, tokens, nq, nkv, head_dim, element_bytes)
    if comm == "a2a" and recompute == "selective":
        kv = 2 * nkv * kv_repeats(nkv, cp)
        return forward * (nq + kv) / (2 * nq + kv)
    return forward
