"""The Adam part of the AdamW update on flat fp32 shards, two interchangeable kernels.

Both apply torch.optim.AdamW's update (Loshchilov & Hutter 2019) with weight decay 0: the
decoupled decay is applied by the caller beforehand, per run of decayed elements, because one
flat shard mixes weight matrices (decayed) with norms and biases (not decayed). With t the 1-based
step:

    m ← β1 m + (1 − β1) g ;  v ← β2 v + (1 − β2) g²
    p ← p − lr / (1 − β1^t) · m / (sqrt(v) / sqrt(1 − β2^t) + ε)

- ``reference``: the single-tensor PyTorch ops, in the order torch.optim.AdamW(foreach=False)
  runs them, chunked so its one sqrt temporary stays bounded.
- ``fused``: torch's fused AdamW kernel (``torch.optim.AdamW(fused=True)``: one multi-tensor
  kernel over every bucket shard, no temporaries; CUDA and CPU). It equals the reference to fp32
  rounding (tested) and is several times faster (benchmarks/RESULTS.md). NVIDIA apex's FusedAdam
  is the same multi-tensor scheme, so apex is not needed for it.

``auto`` picks fused wherever torch has the fused kernel for the device.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

KERNELS = ("auto", "fused", "reference")
CHUNK = 1 << 26  # elements per reference call: its sqrt temporary stays <= 256 MiB


def resolve_kernel(choice: str, device: torch.device) -> str:
    """The kernel `choice` (auto | fused | reference) means on `device`; raises for fused where
    torch has no fused AdamW for the device."""
    if choice not in KERNELS:
        raise ValueError(f"optim.adamw_kernel={choice!r} is not one of {list(KERNELS)}")
    supported = device.type in _get_fused_kernels_supported_devices()
    if choice == "fused" and not supported:
        raise ValueError(f"optim.adamw_kernel=fused: this torch ({torch.__version__}) has no fused AdamW "
                         f"kernel for {device.type} devices; use optim.adamw_kernel=reference (or auto)")
    if choice == "auto":
        return "fused" if supported else "reference"
    return choice


def adamw_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
           *, step: int, lr: float, beta1: float, beta2: float, eps: float) -> None:
    """The reference update, in place on flat fp32 tensors (the same operations in the same order
    as torch.optim.AdamW's single-tensor path, so results match it to rounding)."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = lr / (1 - beta1 ** step)
    denom = exp_avg_sq.sqrt().div_((1 - beta2 ** step) ** 0.5).add_(eps)  # one temporary
    param.addcdiv_(exp_avg, denom, value=-step_size)


def reference_update(shards: list[tuple[torch.Tensor, ...]], *, step: int, lr: float, beta1: float,
                     beta2: float, eps: float) -> None:
    """adamw_ over (param, grad, exp_avg, exp_avg_sq) shards; elementwise, so chunking changes no
    result, it only bounds the temporary."""
    for param, grad, exp_avg, exp_avg_sq in shards:
        for lo in range(0, grad.numel(), CHUNK):
            hi = lo + CHUNK
            adamw_(param[lo:hi], grad[lo:hi], exp_avg[lo:hi], exp_avg_sq[lo:hi], step=step, lr=lr,
                   beta1=beta1, beta2=beta2, eps=eps)


class FusedUpdate:
    """torch.optim.AdamW(fused=True) driven over fixed flat shards.

    The optimizer sees one parameter per shard: a Parameter sharing the shard's storage, whose
    exp_avg / exp_avg_sq state are the caller's own tensors, so the state stays in the caller's
    contiguous buffer (and its checkpoints). The step count and learning rate are set on every
    call, so skipped steps and checkpoint loads need no bookkeeping here."""

    def __init__(self, params: list[torch.Tensor], exp_avgs: list[torch.Tensor],
                 exp_avg_sqs: list[torch.Tensor], beta1: float, beta2: float, eps: float):
        self.params = [nn.Parameter(p, requires_grad=False) for p in params]  # same storage as p
        self.optimizer = torch.optim.AdamW(self.params, lr=0.0, betas=(beta1, beta2), eps=eps,
                                           weight_decay=0.0, fused=True)
        device = params[0].device
        for p, m, v in zip(self.params, exp_avgs, exp_avg_sqs):
            self.optimizer.state[p] = {"step": torch.zeros((), dtype=torch.float32, device=device),
                                       "exp_avg": m, "exp_avg_sq": v}

    def __call__(self, grads: list[torch.Tensor], *, step: int, lr: float) -> None:
        for p, g in zip(self.params, grads):
            p.grad = g
            self.optimizer.state[p]["step"].fill_(step - 1)  # the kernel counts it up to `step`
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.step()
        for p in self.params:
            p.grad = None  # the grads are views of the caller's buffer: hold no reference
