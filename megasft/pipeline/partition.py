"""Which decoder layers each pipeline (virtual) stage owns.

With pp stages and v model chunks per rank there are pp*v chunks; chunk c holds a contiguous run
of layers, and rank r owns chunks r, r + pp, r + 2*pp, ... (Megatron's round-robin assignment for
the interleaved schedule, Narayanan et al. 2021, Sec. 2.2). The embedding lives on chunk 0
(first stage), the final norm and LM head on chunk pp*v - 1 (last stage).
"""
from __future__ import annotations

from typing import Optional, Sequence


def chunk_layer_counts(num_layers: int, num_chunks: int,
                       explicit: Optional[Sequence[int]] = None) -> list[int]:
    if explicit is not None:
        if len(explicit) != num_chunks or sum(explicit) != num_layers or min(explicit) < 1:
            raise ValueError(f"pipeline_layers={list(explicit)} must list {num_chunks} positive counts "
                             f"summing to num_layers={num_layers}")
        return list(explicit)
    if num_layers % num_chunks:
        raise ValueError(f"num_layers={num_layers} does not split evenly into {num_chunks} pipeline chunks; "
                         "give pipeline_layers explicitly")
    return [num_layers // num_chunks] * num_chunks


def rank_chunks(num_layers: int, pp: int, pp_rank: int, virtual: int = 1,
                explicit: Optional[Sequence[int]] = None) -> list[list[int]]:
    """Global layer ids of each model chunk held by pipeline rank `pp_rank`, in chunk order."""
    counts = chunk_layer_counts(num_layers, pp * virtual, explicit)
    starts = [sum(counts[:c]) for c in range(len(counts))]
    return [list(range(starts[c], starts[c] + counts[c]))
            for c in range(pp_rank, pp * virtual, pp)]
