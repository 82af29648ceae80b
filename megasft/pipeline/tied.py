"""Tied input/output embeddings across pipeline stages.

Small Llamas tie the LM head to the token embedding. With pp > 1 the embedding lives on the first
stage and the head on the last, so each holds a copy of the one canonical tensor
``model.embed_tokens.weight`` (initialised identically from it). The copies stay identical because
their gradients are summed over ``ps.embedding_group`` (first + last stage of the pipeline) before
every optimizer step: both then see the gradient of the tied parameter and take the same update
(Megatron-LM does the same with its embedding group).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn


def tied_embedding_copies(chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    """This rank's copies of a pipeline-tied embedding: the LM head marked ``tied_embedding`` on
    the last stage, the embedding of a tying model whose head lives on another stage."""
    copies = []
    for chunk in chunks:
        head = getattr(chunk, "lm_head", None)
        if head is not None and getattr(head.weight, "tied_embedding", False):
            copies.append(head.weight)
        embedding = getattr(chunk, "embedding", None)
        if embedding is not None and chunk.cfg.tie_embeddings and not chunk.post_process:
            copies.append(embedding.weight)
    return copies


def mark_tied_embeddings(chunks: Iterable[nn.Module]) -> list[nn.Parameter]:
    """Tag the copies for the optimizer before it is built: ``pp_copies = 2`` so the global grad
    norm counts the tied tensor once, ``model_grad_sync = True`` so an overlapped DP reduction
    waits for sync_tied_embedding_grads. Returns the copies."""
    copies = tied_embedding_copies(chunks)
    for param in copies:
        param.tied_embedding = True
        param.pp_copies = 2
        param.model_grad_sync = True
    return copies


def sync_tied_embedding_grads(chunks: Iterable[nn.Module], ps) -> None:
    """Sum the tied copies' gradients over the embedding group (param.main_grad when present,
    else .grad). Call after the schedule and before the optimizer; a no-op without pipelining."""
    if ps.embedding_group is None:
        return
    for param in tied_embedding_copies(chunks):
        grad = getattr(param, "main_grad", None)
        if grad is None:
            if param.grad is None:   # both stages must join the all-reduce
                param.grad = torch.zeros_like(param)
            grad = param.grad
        dist.all_reduce(grad, group=ps.embedding_group)
