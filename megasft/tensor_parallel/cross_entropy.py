"""Vocab-parallel masked cross-entropy that never gathers the full vocabulary.

Each TP rank holds logits for its vocabulary slice [N, V/tp]. The softmax statistics are combined
with three all-reduces of size N (max, sum of exponentials, target logit), as in Megatron-LM's
``vocab_parallel_cross_entropy``:

    loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,y_i - m_i),    m_i = max_v z_iv

Tokens whose label is IGNORE_INDEX contribute 0 and are not counted. Callers receive
``(loss_sum, valid_count)`` and normalise over the whole global batch themselves. Logits may be
bf16; the statistics are computed in fp32. The fused LM-head path applies Gemma's final-logit
soft-cap z = c * tanh(raw / c) itself (elementwise, so TP-local), and its backward multiplies by
dz/draw = 1 - tanh^2(raw / c).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasft import collectives
from megasft.data.batch import IGNORE_INDEX
from megasft.tensor_parallel.comm import Group, all_reduce


def _mask_padding_(z: torch.Tensor, vocab_valid: int) -> torch.Tensor:
    # Padded vocabulary rows are never predicted: they take no probability mass.
    if vocab_valid < z.shape[-1]:
        z[:, vocab_valid:] = float("-inf")
    return z


def _target_slots(target: torch.Tensor, vocab_start: int, local_vocab: int):
    """(valid, local target index, in_range): which tokens are trained, and which of those have
    their target in this rank's vocabulary slice (index 0 where not)."""
    valid = target != IGNORE_INDEX
    local_target = target - vocab_start
    in_range = valid & (local_target >= 0) & (local_target < local_vocab)
    return valid, local_target.masked_fill(~in_range, 0), in_range


def _softmax_loss_(z: torch.Tensor, target: torch.Tensor, vocab_start: int, vocab_valid: int, group: Group):
    """Masked CE of vocab-sharded fp32 logits z [n, V/tp], turning z into the softmax *in place*.
    Returns (loss [n] masked, valid [n], log-sum-exp [n], local target ids [n], in_range [n])."""
    z_max = _mask_padding_(z, vocab_valid).max(dim=-1).values
    collectives.all_reduce(z_max, group, op=dist.ReduceOp.MAX)
    z.sub_(z_max.unsqueeze(-1))

    valid, local_target, in_range = _target_slots(target, vocab_start, z.shape[-1])
    rows = torch.arange(z.shape[0], device=z.device)
    target_logit = z[rows, local_target] * in_range
    all_reduce(target_logit, group)

    sum_exp = z.exp_().sum(dim=-1)
    all_reduce(sum_exp, group)
    loss = (sum_exp.log() - target_logit) * valid
    z.div_(sum_exp.unsqueeze(-1))
    return loss, valid, sum_exp.log_().add_(z_max), local_target, in_range


def _softmax_grad_(softmax: torch.Tensor, grad_loss: torch.Tensor, valid, local_target, in_range) -> torch.Tensor:
    """d loss_i / d z_iv = softmax_iv - [v == y_i], scaled by the incoming grad, zero for ignored
    tokens; computed in place on `softmax`."""
    scale = (grad_loss.float() * valid).unsqueeze(-1)
    grad = softmax.mul_(scale)
    rows = torch.arange(grad.shape[0], device=grad.device)
    grad[rows, local_target] -= scale.squeeze(-1) * in_range
    return grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, group):
        # One fp32 working copy, updated in place: it ends up as the softmax saved for backward.
        z = logits.to(torch.float32, copy=True)                 # [N, V/tp]
        loss, valid, _, local_target, in_range = _softmax_loss_(z, target, vocab_start, vocab_valid, group)
        ctx.save_for_backward(z, local_target, in_range, valid)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_valid):
        softmax, local_target, in_range, valid = ctx.saved_tensors
        grad = _softmax_grad_(softmax, grad_loss, valid, local_target, in_range)
        return grad.to(ctx.logits_dtype), None, None, None, None


class _ChunkedHeadCrossEntropy(torch.autograd.Function):
    """LM head + vocab-parallel CE over chunks of tokens; each chunk's logits are recomputed in
    backward, so at most one [chunk, V/tp] block exists at a time instead of [N, V/tp] (the "logits
    wall": 8k tokens x 128k vocab in fp32 is 4 GB). Backward needs no communication: the saved
    log-sum-exp already holds the global statistics."""

    @staticmethod
    def forward(ctx, hidden, weight, target, vocab_start, vocab_valid, group, chunk, softcap):
        losses, valids, lses = [], [], []
        for h, t in zip(hidden.split(chunk), target.split(chunk)):
            z = (h @ weight.t()).float()                          # [chunk, V/tp]
            if softcap is not None:
                z = z.div_(softcap).tanh_().mul_(softcap)
            loss, valid, lse, _, _ = _softmax_loss_(z, t, vocab_start, vocab_valid, group)
            losses.append(loss), valids.append(valid), lses.append(lse)
        valid = torch.cat(valids)
        ctx.save_for_backward(hidden, weight, target, torch.cat(lses))
        ctx.meta = (vocab_start, vocab_valid, chunk, softcap)
        ctx.mark_non_differentiable(valid)
        return torch.cat(losses), valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_valid):
        hidden, weight, target, lse = ctx.saved_tensors
        vocab_start, vocab_valid, chunk, softcap = ctx.meta
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for start in range(0, hidden.shape[0], chunk):
            sl = slice(start, start + chunk)
            h, t = hidden[sl], target[sl]
            z = (h @ weight.t()).float()
            if softcap is not None:
                tanh = z.div_(softcap).tanh_()
                z = tanh * softcap
            softmax = _mask_padding_(z, vocab_valid).sub_(lse[sl].unsqueeze(-1)).exp_()
            grad_z = _softmax_grad_(softmax, grad_loss[sl], *_target_slots(t, vocab_start, z.shape[-1]))
            if softcap is not None:
                grad_z.mul_(1 - tanh.square_())                   # through z = c * tanh(raw / c)
            grad_hidden[sl] = (grad_z.to(weight.dtype) @ weight).to(hidden.dtype)   # partial over TP
            grad_weight.addmm_(grad_z.t(), h.float())
        return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None, None, None


def lm_head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_start: int,
                          vocab_valid: int, group: Group, chunk_tokens: int,
                          softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused LM head + masked CE: hidden [..., h] (in the TP region), weight [V/tp, h], target [...].
    Same (loss_sum, valid_count) and gradients as ``vocab_parallel_cross_entropy(hidden @ weight.T, ...)``
    (of ``softcap * tanh(hidden @ weight.T / softcap)`` with a softcap) without ever
    materialising the full logits."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    loss, valid = _ChunkedHeadCrossEntropy.apply(flat, weight, target.reshape(-1), vocab_start, vocab_valid,
                                                 group, chunk_tokens, softcap)
    return loss.sum(), valid.sum()


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, vocab_start: int,
                                 vocab_valid: int, group: Group) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked CE over vocab-sharded logits.

    Args:
        logits: [..., V/tp] this rank's slice of the (padded) vocabulary.
        target: [...] global target ids (already shifted), IGNORE_INDEX where not trained.
        vocab_start: global id of this rank's first vocabulary row.
        vocab_valid: how many of this rank's rows are real (the rest are vocabulary padding).
    Returns:
        (loss_sum, valid_count): fp32 scalar sum of per-token losses and int64 count of trained tokens.
    """
    flat = logits.reshape(-1, logits.shape[-1])
    loss, valid = _VocabParallelCrossEntropy.apply(flat, target.reshape(-1), vocab_start,
                                                    vocab_valid, group)
    return loss.sum(), valid.sum()
