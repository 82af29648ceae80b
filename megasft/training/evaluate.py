"""Evaluation of a dataset mixture: the loss of every source's eval split and the mixture's.

The mixture's eval loss is trained-token-weighted: the sum of token losses over every source's eval
split divided by their trained tokens together (a source with more eval tokens counts more), the
number a single eval set holding all of them would give.
"""
from __future__ import annotations


def evaluate_mixture(trainer, evals) -> tuple[float, int, dict]:
    """(mixture loss, its trained tokens, per-source record fields eval_loss/<name>, eval_tokens/<name>)
    over one pass of each source's eval split (megasft.data.mixture.MixtureEval). Every rank takes part."""
    fields: dict = {}
    loss_sum, tokens = 0.0, 0
    for name, loader in evals.loaders.items():
        loss, count = trainer.evaluate(loader)   # mean over `count` trained tokens
        fields[f"eval_loss/{name}"], fields[f"eval_tokens/{name}"] = loss, count
        loss_sum += loss * count
        tokens += count
    return loss_sum / max(tokens, 1), tokens, fields

