"""Backward split in two for zero-bubble pipelining (Qi et al. 2023, "Zero Bubble Pipeline
Parallelism", Sec. 2): B computes the gradient of a linear layer's input — what the previous stage
waits for — and W, its weight gradient, which nobody waits for and can fill a pipeline bubble.

A layer whose ``gemm`` is a :class:`DeferredWeightGemm` computes in backward only dX = dY W (and
the bias gradient, a cheap sum) while its store is capturing, and queues (W, X, dY); the W pass
later computes dW = dY^T X per queued GEMM and hands it to autograd as the weight's gradient
(``torch.autograd.backward(weight, dW)``), so gradient accumulation hooks — the fp32 main-grad
fold and the overlapped DP reduction — run exactly as in an unsplit backward. Embedding, norm and
LM-head weights are not split: their gradients stay in B (they are cheap, or in the LM head's
case fused with the loss).

Memory: each queued GEMM keeps its input X and output gradient dY until its W pass — a
micro-batch's activations are fully released only after W, which is what the schedules count.
"""
from __future__ import annotations

import contextlib
import functools
from collections import deque
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn


class WeightGradStore:
    """This rank's queues of deferred weight-gradient computations (callables), one group per B
    pass, in order; one queue per key (the model chunk, where a rank runs several)."""

    def __init__(self) -> None:
        self.capturing: Optional[list] = None
        self.groups: dict[int, deque] = {}

    @contextlib.contextmanager
    def capture(self, key: int = 0) -> Iterator[None]:
        """Inside: deferred GEMMs queue their weight gradients as one group (one B pass) under `key`."""
        self.capturing = []
        try:
            yield
        finally:
            self.groups.setdefault(key, deque()).append(self.capturing)
            self.capturing = None

    def pending(self) -> int:
        return sum(len(queue) for queue in self.groups.values())

    def run_oldest(self, key: int = 0) -> None:
        """The W pass of the oldest B pass under `key`: dW = dY^T X for each of its GEMMs,
        accumulated by autograd."""
        for weight_grad in self.groups[key].popleft():
            weight_grad()

    @staticmethod
    def accumulate(weight: nn.Parameter, x: torch.Tensor, grad_out: torch.Tensor) -> None:
        """weight.grad += dY^T X through autograd, so accumulation hooks run as usual."""
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])   # [out, in]
        torch.autograd.backward(weight, grad_w)


class _DeferredLinear(torch.autograd.Function):
    """y = x W^T + b. The weight enters detached (the parameter itself rides in a tuple, which
    autograd does not track), so B never touches the parameter's gradient or its accumulation
    hooks — returning None for it would still fire them — and W hands autograd dW explicitly."""

    @staticmethod
    def forward(ctx, x, weight_data, bias, store, param_box):
        ctx.save_for_backward(x, weight_data)
        ctx.store, ctx.param, ctx.has_bias = store, param_box[0], bias is not None
        return F.linear(x, weight_data, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight                                                 # [..., in]
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        if ctx.store.capturing is not None:
            ctx.store.capturing.append(functools.partial(WeightGradStore.accumulate, ctx.param, x, grad_out))
        else:   # a backward outside a split pass: the weight gradient now
            WeightGradStore.accumulate(ctx.param, x, grad_out)
        return grad_x, None, grad_b, None, None


class DeferredWeightGemm:
    """A linear layer's ``gemm`` (y = x W^T + b) whose weight gradient can be deferred to `store`.
    A plain callable, like F.linear: it adds no parameters or state to the module."""

    def __init__(self, store: WeightGradStore):
        self.store = store

    def __call__(self, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        return _DeferredLinear.apply(x, weight.detach(), bias, self.store, (weight,))


def use_deferred_weight_grads(module: nn.Module, store: WeightGradStore) -> int:
    """Give every TP linear layer under `module` a DeferredWeightGemm on `store`; returns how many."""
    from megasft.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    count = 0
    for m in module.modules():
        if isinstance(m, (ColumnParallelLinear, RowParallelLinear)):
            if m.gemm is not F.linear:
                raise ValueError(f"{type(m).__name__} already has a custom GEMM ({m.gemm!r}); zero-bubble "
                                 "schedules split F.linear only (train.fp8 must be off)")
            m.gemm = DeferredWeightGemm(store)
            count += 1
    return count
