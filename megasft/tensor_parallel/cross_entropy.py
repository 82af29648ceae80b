"""Vocab-parallel masked cross-entropy that never gathers the full vocabulary.

Each TP rank holds logits for its vocabulary slice [N, V/tp]. The softmax statistics are combined
with three all-reduces of size N (max, sum of exponentials, target logit), as in Megatron-LM's
``vocab_parallel_cross_entropy``:

    loss_i = log(sum_v exp(z_iv - m_i)) - (z_i,y_i - m_i),    m_i = max_v z_iv

Tokens whose label is IGNORE_INDEX contribute 0 and are not counted. Callers receive
``(loss_sum, valid_count)`` and normalise over the whole global batch themselves. Logits may be
bf16; the statistics are computed in fp32.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from megasft.parallel_state import group_size
from megasft.tensor_parallel.comm import Group, all_reduce

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """HF convention -> next-token targets: target[t] = labels[t + 1]; the last position gets
    IGNORE_INDEX. [b, s] -> [b, s]."""
    pad = labels.new_full((labels.shape[0], 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, vocab_start, vocab_valid, group):
        # logits [N, V/tp] (any float dtype); target [N] with global vocab ids or IGNORE_INDEX.
        # One fp32 working copy, updated in place: it ends up as the softmax saved for backward.
        z = logits.to(torch.float32, copy=True)
        local_vocab = z.shape[-1]
        if vocab_valid < local_vocab:
            # Padded vocabulary rows are never predicted: they take no probability mass.
            z[:, vocab_valid:] = float("-inf")
        z_max = z.max(dim=-1).values
        if group_size(group) > 1:
            dist.all_reduce(z_max, op=dist.ReduceOp.MAX, group=group)
        z.sub_(z_max.unsqueeze(-1))

        valid = target != IGNORE_INDEX
        local_target = target - vocab_start
        in_range = valid & (local_target >= 0) & (local_target < local_vocab)
        local_target = local_target.masked_fill(~in_range, 0)
        rows = torch.arange(z.shape[0], device=z.device)
        target_logit = z[rows, local_target] * in_range
        all_reduce(target_logit, group)

        exp = z.exp_()
        sum_exp = exp.sum(dim=-1)
        all_reduce(sum_exp, group)
        loss = (sum_exp.log() - target_logit) * valid

        exp.div_(sum_exp.unsqueeze(-1))                       # softmax, kept for backward
        ctx.save_for_backward(exp, local_target, in_range, valid)
        ctx.logits_dtype = logits.dtype
        ctx.mark_non_differentiable(valid)
        return loss, valid

    @staticmethod
    def backward(ctx, grad_loss, _grad_valid):
        softmax, local_target, in_range, valid = ctx.saved_tensors
        # d loss_i / d z_iv = softmax_iv - [v == y_i], zero for ignored tokens.
        scale = (grad_loss.float() * valid).unsqueeze(-1)
        grad = softmax.mul_(scale)
        rows = torch.arange(grad.shape[0], device=grad.device)
        grad[rows, local_target] -= scale.squeeze(-1) * in_range
        return grad.to(ctx.logits_dtype), None, None, None, None


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
