"""Pipeline partition and schedule arithmetic: who owns which layers, bubbles, in-flight micro-batches.

Chunk ``c`` of the ``pp * v`` model chunks lives on pipeline rank ``c % pp`` (Megatron's interleaved
assignment, Narayanan et al. 2021 Fig. 4), so rank 0 owns chunks 0, pp, 2pp, ... and holds the
embedding (chunk 0); rank pp-1 owns the last chunk and holds the final norm and LM head.
"""
from __future__ import annotations

from megasft.config import Config, ConfigError


def schedule_name(cfg: Config) -> str:
    """The schedule a config runs: none (pp=1) | 1f1b | interleaved | all_forward_all_backward."""
    p = cfg.parallel
    if p.pp == 1:
        return "none"
    if p.pipeline_schedule == "auto":
        return "interleaved" if p.virtual_pipeline_size > 1 else "1f1b"
    if (p.pipeline_schedule == "interleaved") != (p.virtual_pipeline_size > 1):
        raise ConfigError(
            f"parallel.pipeline_schedule={p.pipeline_schedule} with virtual_pipeline_size="
            f"{p.virtual_pipeline_size}: the interleaved schedule needs virtual_pipeline_size > 1 and the "
            "others need 1; set parallel.pipeline_schedule=auto to follow virtual_pipeline_size")
    return p.pipeline_schedule


def check_schedule(cfg: Config) -> str:
    """schedule_name, plus the interleaved schedule's rule that m is a multiple of pp
    (megasft.pipeline.schedules, as Megatron-LM's)."""
    schedule = schedule_name(cfg)
    m, pp = micro_batches(cfg), cfg.parallel.pp
    if schedule == "interleaved" and m % pp:
        raise ConfigError(
            f"the interleaved schedule needs micro-batches per step ({m} = rows / (dp * micro_batch_size)) "
            f"to be a multiple of pp={pp}; change data.global_batch_tokens or data.micro_batch_size, "
            "or use parallel.virtual_pipeline_size=1")
    return schedule


def chunk_layers(cfg: Config) -> list[int]:
    """Decoder layers of each of the pp*v chunks, in model order (explicit list or an even split)."""
    p = cfg.parallel
    chunks = p.pp * p.virtual_pipeline_size
    if p.pipeline_layers is not None:
        return list(p.pipeline_layers)
    return [cfg.model.num_layers // chunks] * chunks


def rank_chunk_layers(cfg: Config, pp_rank: int) -> list[int]:
    """Layer counts of the chunks pipeline rank ``pp_rank`` owns (v entries)."""
    return chunk_layers(cfg)[pp_rank::cfg.parallel.pp]


def micro_batches(cfg: Config) -> int:
    """Micro-batches per optimizer step on one data-parallel rank (m in the papers)."""
    d = cfg.data
    return d.rows_per_step() // (cfg.parallel.dp * d.micro_batch_size)


def bubble_fraction(schedule: str, pp: int, m: int, v: int = 1) -> float:
    """Idle fraction of a pipeline step.

    Narayanan et al. 2021 ("Efficient Large-Scale Language Model Training on GPU Clusters Using
    Megatron-LM"), Sec. 2.2: bubble time / total time = (p-1)/(m+p-1) for GPipe and 1F1B, and with
    v interleaved chunks per rank the bubble shrinks by v: (p-1)/(v*m+p-1).
    """
    if schedule == "none" or pp == 1:
        return 0.0
    if schedule == "interleaved":
        return (pp - 1) / (v * m + pp - 1)
    return (pp - 1) / (m + pp - 1)


def bubble_slots(schedule: str, pp: int, v: int = 1) -> float:
    """Bubble length in units of one micro-batch's work on one rank: (p-1)/v (interleaved) or p-1."""
    if schedule == "none" or pp == 1:
        return 0.0
    return (pp - 1) / v if schedule == "interleaved" else float(pp - 1)


def in_flight_chunks(schedule: str, pp: int, m: int, v: int, pp_rank: int) -> int:
    """Peak number of (micro-batch, model-chunk) forward passes whose activations rank holds.

    * none: one micro-batch at a time (gradient accumulation runs forward then backward).
    * 1F1B (PipeDream-Flush, Narayanan et al. 2021 Sec. 2.2.1): rank r runs p-r warm-up forwards
      before its first backward, so rank 0 holds min(m, p) micro-batches.
    * interleaved (Megatron-LM's schedule, Narayanan et al. 2021 Sec. 2.2.2): rank r warms up with
      2(p-r-1) + (v-1)p chunk forwards plus the one in flight. Summed over rank 0's chunk sizes
      this is the factor (1 + (p-1)/(p v)) of Korthikanti et al. 2022 Sec. 4.2.3. With m == p
      there is no steady phase and every rank runs all m*v forwards first.
    * all_forward_all_backward (GPipe): all m micro-batches.
    """
    if schedule == "none":
        return 1
    if schedule == "all_forward_all_backward":
        return m * v
    if schedule == "interleaved":
        return m * v if m == pp else min(m * v, 2 * (pp - pp_rank - 1) + (v - 1) * pp + 1)
    return min(m, pp - pp_rank)


def balanced_pipeline_layers(num_layers: int, chunks: int) -> list[int] | None:
    """An explicit layer split when ``num_layers`` does not divide into ``chunks``, or None if it does.

    Every chunk gets ceil(L/chunks) layers; the surplus is taken away from the two ends first
    (first, last, second, second-to-last, ...), because chunk 0 also runs the embedding and the last
    chunk the LM head and loss. Llama 3 405B's own 126-layer, 16-stage pipeline is balanced the
    same way (Llama Team 2024, Sec. 3.3.2). None when a chunk would be left empty.
    """
    if num_layers % chunks == 0:
        return None
    per = -(-num_layers // chunks)
    surplus = per * chunks - num_layers
    if per == 1:
        return None
    layers = [per] * chunks
    order = [i for pair in zip(range(chunks), range(chunks - 1, -1, -1)) for i in pair]
    for index in list(dict.fromkeys(order))[:surplus]:
        layers[index] -= 1
    return layers
