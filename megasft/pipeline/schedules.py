"""Forward/backward schedules over the micro-batches of one global batch, model-agnostic.

A schedule calls ``forward_step(chunk_index, micro_batch, input_tensor)``, which runs one model
chunk and returns either the activation to pass on, or — on the last pipeline stage — a pair
``(loss, stats)``: the scalar to back-propagate (already scaled for the global batch) and a dict of
detached numbers to sum over micro-batches (e.g. loss_sum, valid tokens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

ForwardStep = Callable[[int, dict, Optional[torch.Tensor]], object]


@dataclass
class ScheduleResult:
    stats: dict = field(default_factory=dict)   # summed over micro-batches (last stage only)


def _accumulate(total: dict, stats: dict) -> None:
    for key, value in stats.items():
        total[key] = total.get(key, 0.0) + float(value)


def forward_backward_no_pipeline(forward_step: ForwardStep, micro_batches: list[dict],
                                 forward_only: bool = False) -> ScheduleResult:
    """pp=1: forward and backward each micro-batch in turn; gradients accumulate."""
    result = ScheduleResult()
    for batch in micro_batches:
        with torch.set_grad_enabled(not forward_only):
            loss, stats = forward_step(0, batch, None)
        if not forward_only:
            loss.backward()
        _accumulate(result.stats, stats)
    return result


def forward_backward(forward_step: ForwardStep, micro_batches: list[dict], ps, *, num_chunks: int = 1,
                     tensor_shape=None, dtype=None, forward_only: bool = False,
                     schedule: str = "auto") -> ScheduleResult:
    """Run one global batch's micro-batches through this rank's chunks with the configured schedule."""
    if ps.pp == 1:
        return forward_backward_no_pipeline(forward_step, micro_batches, forward_only)
    raise NotImplementedError("pipeline schedules land with the pipeline-parallel issue")


def sync_tied_embedding_grads(chunks, ps) -> None:
    """All-reduce the gradients of the tied embedding copies over the embedding group (pp > 1)."""
    if ps.pp == 1:
        return
    raise NotImplementedError("pipeline schedules land with the pipeline-parallel issue")
