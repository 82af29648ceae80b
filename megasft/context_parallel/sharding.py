"""Which tokens of a packed row each context-parallel rank holds.

Causal attention costs a query work proportional to its position in its document, so cutting a
document into cp contiguous pieces would give the last rank most of the work. Instead every
segment of the row (each document, and the padding tail) is cut into 2*cp equal chunks and CP rank
r holds chunks r and 2*cp-1-r of **every** segment — an early and a late chunk, so each rank does
the same attention work for each document whatever the documents' lengths (Megatron-Core's THD
scheme). The price is that every segment length must be a multiple of 2*cp: the loader pads each
document to one (untrained tokens at its end, which no real token attends to), costing at most
2*cp-1 slots per document.

A rank's tokens are ordered segment by segment, chunk r before chunk 2cp-1-r, so

  * its tokens of one segment form one causal sequence (every token of chunk r precedes every
    token of chunk 2cp-1-r): the diagonal block of the attention is plain block-causal attention
    over ``cu_seqlens // cp``;
  * each rank holds ``total / cp`` tokens of the flattened [b * s] micro-batch, ``s / cp`` of each
    row, so activations keep the [s/cp, b, h] layout and every shape agrees across CP ranks.
"""
from __future__ import annotations

import dataclasses

import torch

from megasft.data.batch import MicroBatch


def padded_length(n: int, cp: int) -> int:
    """A document's length rounded up to a multiple of 2*cp (its length in a CP row)."""
    step = 2 * cp
    return -(-n // step) * step


def check_row(cu_seqlens: torch.Tensor, cp: int) -> None:
    """Raise unless every segment of `cu_seqlens` splits into 2*cp equal chunks."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    bad = torch.nonzero(lengths % (2 * cp)).flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"segment {i} of the micro-batch has {int(lengths[i])} tokens, not a multiple of "
                         f"2*cp={2 * cp}: context parallelism needs every document padded to a multiple "
                         "of 2*cp (the loader does this when parallel.cp > 1)")


def local_cu_seqlens(cu_seqlens: torch.Tensor, cp: int) -> torch.Tensor:
    """Segment boundaries over one rank's tokens: each segment keeps 1/cp of its length."""
    return torch.div(cu_seqlens, cp, rounding_mode="floor")


def local_token_index(cu_seqlens: torch.Tensor, cp: int, rank: int) -> torch.Tensor:
    """Flattened indices (into the b*s tokens) of the tokens CP rank `rank` holds, in its order:
    for each segment, chunk `rank` then chunk 2*cp-1-rank. [total / cp] int64"""
    check_row(cu_seqlens, cp)
    cu = cu_seqlens.long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    chunk = lengths // (2 * cp)                                           # [segments]
    # Each segment contributes two runs of `chunk` tokens; run k of segment i starts at `first`.
    first = torch.stack([starts + rank * chunk, starts + (2 * cp - 1 - rank) * chunk], 1).flatten()
    run = chunk.repeat_interleave(2)                                      # [2 * segments]
    offsets = torch.arange(int(run.sum()), device=cu.device) - torch.repeat_interleave(
        torch.cumsum(run, 0) - run, run)
    return torch.repeat_interleave(first, run) + offsets


def split_micro_batch(batch: MicroBatch, cp: int, rank: int) -> MicroBatch:
    """CP rank `rank`'s tokens of a micro-batch of full rows (labels shifted first: the target of a
    chunk's last token is the next chunk's first token, held by another rank)."""
    if cp == 1:
        return batch
    s = batch.input_ids.shape[1]
    if s % (2 * cp):
        raise ValueError(f"rows of {s} tokens do not split into 2*cp={2 * cp} chunks")
    index = local_token_index(batch.cu_seqlens, cp, rank).to(batch.input_ids.device)   # [b*s/cp]
    part = dataclasses.replace(batch, cp=cp, token_index=index)
    return dataclasses.replace(
        part, input_ids=part.local(batch.input_ids), position_ids=part.local(batch.position_ids),
        labels=None if batch.labels is None else part.local(batch.targets()), labels_shifted=batch.labels is not None)
