"""Tied input/output embeddings across pipeline stages.

Small Llamas tie the LM head to the token embedding. With pp > 1 the embedding lives on the first
stage and the head on the last, so each holds a copy of the one canonical tensor
``model.embed_tokens.weight`` (initialised identically from it). The copies stay identical because
their gradients are summed over ``ps.embedding_group`` (first + last stage of the pipeline) before
every optimizer step: both then see the gradient of the tied parameter and take the same update
(Megatron-LM does the same with its embedding group). The model marks the copies in their
ParamSpec (``tied``, ``pp_copies=2``) when it builds the stage.

Under ZBV the model's first and last chunks are both on the first stage: that rank holds both
copies (in different chunks) and sums their gradients itself, and the last stage holds none.
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

from megasft import collectives
from megasft.tensor_parallel.spec import spec_of


def tied_copies(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    """The pipeline-tied embedding copies among `params`."""
    return [p for p in params if spec_of(p).tied]


def sync_tied_embedding_grads(params: Iterable[nn.Parameter], embedding_group: Optional[dist.ProcessGroup],
                              grad_of: Callable[[nn.Parameter], Optional[torch.Tensor]]) -> None:
    """Sum the tied copies' gradients (``grad_of(param)``: the fp32 main grad under the optimizer,
    ``.grad`` without one) over the embedding group, or on this rank when it holds both copies; a
    no-op without pipelining."""
    copies = tied_copies(params)
    if len(copies) == 2:   # ZBV: embedding and LM head on this rank
        grads = [_grad_or_zeros(param, grad_of) for param in copies]
        total = grads[0] + grads[1]
        for grad in grads:
            grad.copy_(total)
        return
    if embedding_group is None:
        return
    for param in copies:
        collectives.all_reduce(_grad_or_zeros(param, grad_of), embedding_group)


def _grad_or_zeros(param: nn.Parameter, grad_of) -> torch.Tensor:
    grad = grad_of(param)
    if grad is None:   # every holder must contribute (and both stages join the all-reduce)
        param.grad = grad = torch.zeros_like(param)
    return grad
