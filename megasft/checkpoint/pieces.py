"""This rank's model weights and optimizer state as blocks of canonical (Hugging Face) tensors.

A checkpoint stores every tensor under its canonical name (``model/<hf name>``,
``optim/exp_avg/<hf name>``, ...) with the full canonical shape; each rank contributes the
rectangular blocks it holds, with their offsets. Because nothing in the stored form depends on
tp, pp or dp, torch.distributed.checkpoint can load any layout's blocks from any other layout's
save (it reads the overlap of saved and requested blocks): resharding needs no extra code.

How a rank's tensors map to canonical blocks. A local parameter is a set of pieces of
canonical tensors (the ParamSpec split, see megasft.tensor_parallel.spec): along the split dim,
local rows [loc, loc + keep) are canonical rows [shard.start, shard.start + keep) of part i
(vocab padding rows belong to no canonical tensor). The ZeRO-1 optimizer holds a flat element
range [a, b) of the row-major flattened parameter (``DistributedOptimizer.param_shards``). A flat
range of an [R, C] tensor is at most three rectangles (a partial first row, full rows, a partial
last row); each rectangle, clipped to each piece, is a canonical block, and its elements are a
contiguous run of the flat range, so the block is a ``view`` of the optimizer's shard columns —
loading writes straight into the optimizer. Model weights are the flat range [0, numel).

Replicas (norm weights on every TP rank, kv heads copied when tp > num_kv_heads, a pipeline-tied
LM head, DP copies) are loaded by every holder but written by one (``Block.write``), so each
canonical element is stored exactly once; DCP's global-plan validation rejects overlaps or gaps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from megasft.hf.names import canonical_names, full_shapes
from megasft.tensor_parallel.spec import first_replica, spec_of

MODEL_PREFIX = "model/"
OPTIM_ROWS = ("main", "exp_avg", "exp_avg_sq")  # rows of DistributedOptimizer.shard_state


@dataclass
class Block:
    """One rectangular block of a canonical tensor held by this rank."""

    offsets: tuple[int, ...]  # where the block starts in the canonical tensor
    tensor: torch.Tensor      # shape = the block's size; a view into the rank's live storage
    write: bool = True        # False for a replica another rank writes


@dataclass
class TensorPieces:
    """This rank's blocks of one canonical tensor of shape `size` (a DCP state-dict value, handled
    by megasft.checkpoint.resharding)."""

    size: tuple[int, ...]
    dtype: torch.dtype
    blocks: list[Block] = field(default_factory=list)


@dataclass(frozen=True)
class FlatBlock:
    """A canonical block covering flat elements [flat_start, flat_start + numel) of a local param."""

    name: str
    full_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    flat_start: int


def _row_rects(a: int, b: int, cols: int) -> Iterator[tuple[int, int, int, int]]:
    """Rectangles (row_lo, row_hi, col_lo, col_hi) of a row-major [*, cols] tensor covering the
    flat range [a, b), in flat order: partial first row, full rows, partial last row."""
    while a < b:
        row, col = divmod(a, cols)
        if col or b - a < cols:                  # a partial row
            end = min(cols, col + b - a)
            yield row, row + 1, col, end
            a += end - col
        else:                                    # as many full rows as fit
            rows = (b - a) // cols
            yield row, row + rows, 0, cols
            a += rows * cols


def _local_pieces(param: nn.Parameter) -> list[tuple[int, int, int, int, int]]:
    """(part, split dim, local start, keep, canonical start) along the split dim per canonical part;
    an unsplit parameter is one part spanning dim 0."""
    split = spec_of(param).split
    if split is None:
        return [(0, 0, 0, param.shape[0], 0)]
    out, loc = [], 0
    for i, shard in enumerate(split.parts):
        keep = max(0, min(shard.local, shard.size - shard.start))   # drop vocab padding rows
        if keep:
            out.append((i, split.dim, loc, keep, shard.start))
        loc += shard.local
    return out


def flat_blocks(name: str, param: nn.Parameter, a: int, b: int) -> list[FlatBlock]:
    """Canonical blocks covering flat elements [a, b) of the (row-major) local parameter `name`
    (its name inside the model chunk, e.g. 'layers.3.mlp.down.weight')."""
    names, fulls = canonical_names(name, param), full_shapes(param)
    pieces = _local_pieces(param)
    blocks = []
    if param.dim() == 1:
        for part, _, loc, keep, start in pieces:
            lo, hi = max(a, loc), min(b, loc + keep)
            if lo < hi:
                blocks.append(FlatBlock(names[part], fulls[part], (start + lo - loc,), (hi - lo,), lo))
        return blocks
    cols = param.shape[1]
    for r0, r1, c0, c1 in _row_rects(a, b, cols):
        for part, dim, loc, keep, start in pieces:
            lo, hi = ((r0, r1) if dim == 0 else (c0, c1))
            lo, hi = max(lo, loc), min(hi, loc + keep)
            if lo >= hi:
                continue
            rows, cut = ((lo, hi), (c0, c1)) if dim == 0 else ((r0, r1), (lo, hi))
            # A clipped rectangle that is neither one row nor full width is not contiguous in flat
            # order: cut it into rows (no current layer does this; kept for correctness).
            row_ranges = [rows] if rows[1] - rows[0] == 1 or cut[1] - cut[0] == cols else \
                [(r, r + 1) for r in range(*rows)]
            for rr in row_ranges:
                offsets = (rr[0] + start - loc, cut[0]) if dim == 0 else (rr[0], cut[0] + start - loc)
                blocks.append(FlatBlock(names[part], fulls[part], offsets, (rr[1] - rr[0], cut[1] - cut[0]),
                                        rr[0] * cols + cut[0]))
    return blocks


def writes_here(param: nn.Parameter, ps) -> bool:
    """Whether this rank stores `param`'s blocks (the first of its TP copies; the pipeline-tied LM
    head's copy is stored by the embedding's, on the first stage)."""
    spec = spec_of(param)
    if spec.tp_copies > 1 and ps.tp_rank % spec.tp_copies:
        return False
    return not (spec.tied and spec.pp_copies > 1 and spec.tied_head)


def _add(out: dict, key: str, fb: FlatBlock, dtype: torch.dtype, tensor: torch.Tensor, write: bool) -> None:
    entry = out.setdefault(key, TensorPieces(fb.full_shape, dtype))
    entry.blocks.append(Block(fb.offsets, tensor, write))


def model_state(chunks: list[nn.Module], ps) -> dict[str, TensorPieces]:
    """``model/<hf name>`` -> this rank's blocks of the model weights (views of the parameters).
    Only the first DP x CP replica writes: every DP and CP rank holds the same weights (routed
    experts: the first of the ranks holding the same experts, spec.first_replica)."""
    out: dict[str, TensorPieces] = {}
    for chunk in chunks:
        for name, param in chunk.named_parameters():
            flat = param.detach().view(-1)   # must be a view: loading writes through it
            write = first_replica(param, ps) and writes_here(param, ps)
            for fb in flat_blocks(name, param, 0, param.numel()):
                view = flat[fb.flat_start:fb.flat_start + math.prod(fb.shape)].view(fb.shape)
                _add(out, MODEL_PREFIX + fb.name, fb, param.dtype, view, write)
    return out


def optimizer_state(optimizer, chunks: list[nn.Module], ps) -> dict[str, TensorPieces]:
    """``optim/<row>/<hf name>`` -> this rank's blocks of the fp32 main params and Adam moments,
    as views of ``optimizer.shard_state``. Under ZeRO-1 the DP x CP ranks hold disjoint columns and
    all write; a replicated optimizer is written by the first replica."""
    params = {slot.name: slot.param for b in optimizer.grad_buffer.buckets for slot in b.slots}
    local_names = {id(p): n for chunk in chunks for n, p in chunk.named_parameters()}
    out: dict[str, TensorPieces] = {}
    for shard in optimizer.param_shards():
        param = params[shard.name]
        write = (optimizer.distributed or first_replica(param, ps)) and writes_here(param, ps)
        rows = optimizer.param_state(shard)
        for fb in flat_blocks(local_names[id(param)], param, shard.param_start, shard.param_end):
            lo = fb.flat_start - shard.param_start
            for row in OPTIM_ROWS:
                view = rows[row][lo:lo + math.prod(fb.shape)].view(fb.shape)
                _add(out, f"optim/{row}/{fb.name}", fb, torch.float32, view, write)
    return out


def reset_main_params(optimizer) -> None:
    """Copy the model weights into the optimizer's fp32 main params and zero the moments (after a
    weights-only load: a checkpoint converted from Hugging Face has no optimizer state)."""
    params = {slot.name: slot.param for b in optimizer.grad_buffer.buckets for slot in b.slots}
    with torch.no_grad():
        for shard in optimizer.param_shards():
            rows = optimizer.param_state(shard)
            flat = params[shard.name].detach().reshape(-1)
            rows["main"].copy_(flat[shard.param_start:shard.param_end])
            rows["exp_avg"].zero_()
            rows["exp_avg_sq"].zero_()
