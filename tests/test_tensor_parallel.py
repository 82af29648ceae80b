"""Tensor/sequence-parallel Llama vs transformers, on real gloo processes.

One spawned group of 4 ranks checks every layout: for each case the transformers model runs each
document of a packed batch alone (the reference), and megasft runs the packed rows at the given
TP/SP layout; losses, logits and every parameter's gradient must agree.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.testing import assert_close

from megasft.config import ConfigError
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megasft.tensor_parallel.spec import Shard
from tests.layouts import check_tp_equivalence
from tests.multiproc import run_ranks
from tests.oracle import tiny_fields

CASES = [
    # (name, tp, sequence_parallel, model field overrides)
    ("tp1", 1, False, {}),
    ("tp2", 2, False, {}),
    ("tp2-sp", 2, True, {}),
    ("tp4-kv-replicated", 4, False, dict(num_attention_heads=8, num_kv_heads=2)),
    ("tp4-sp-kv-replicated", 4, True, dict(num_attention_heads=8, num_kv_heads=2)),
    ("tp2-sp-fused-loss", 2, True, dict(loss_chunk_tokens=5)),
    ("tp4-sp-tied-bias", 4, True, dict(num_attention_heads=4, num_kv_heads=4, tie_embeddings=True,
                                       qkv_bias=True)),
]
ROWS = [[5, 7, 4], [9, 3]]      # two packed rows of 16 tokens; the second ends in padding
SEQ = 16


def _cross_entropy_cases() -> None:
    ps = ParallelState.build(4, 1)
    vocab, padded = 1003, 1024
    g = torch.Generator().manual_seed(3)
    full = torch.randn(12, padded, generator=g)
    target = torch.randint(0, vocab, (12,), generator=g)
    target[[1, 5, 6]] = -100
    shard = Shard(vocab, 4, ps.tp_rank, padded=padded)
    valid = max(0, min(shard.local, vocab - shard.start))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for tgt in (target, torch.full_like(target, -100)):
            local = full[:, shard.start:shard.start + shard.local].clone().to(dtype).requires_grad_()
            loss_sum, count = vocab_parallel_cross_entropy(local, tgt, shard.start, valid, ps.tp_group)
            loss_sum.backward()
            ref_logits = full[:, :vocab].to(dtype).float().requires_grad_()
            ref = F.cross_entropy(ref_logits, tgt, ignore_index=-100, reduction="sum")
            ref.backward()
            assert int(count) == int((tgt != -100).sum())
            assert torch.isfinite(loss_sum) and torch.isfinite(local.grad.float()).all()
            assert_close(loss_sum, ref.detach(), rtol=tol, atol=tol)
            ref_grad = torch.cat([ref_logits.grad, torch.zeros(12, padded - vocab)], dim=1)
            assert_close(local.grad.float(), ref_grad[:, shard.start:shard.start + shard.local],
                         rtol=tol, atol=tol)


def _rank_main() -> list[str]:
    done = []
    for name, tp, sp, overrides in CASES:
        try:
            check_tp_equivalence(tp, sp, tiny_fields(**overrides), ROWS, SEQ)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
        done.append(name)
    _cross_entropy_cases()
    done.append("vocab-parallel-ce")
    try:
        ParallelState.from_env(tp=3, pp=1)
    except ConfigError as err:
        assert "tp*pp=3*1=3" in str(err) and "world_size=4" in str(err), str(err)
        done.append("invalid-layout")
    return done


def test_tensor_parallel_matches_transformers():
    results = run_ranks(_rank_main, 4, timeout=300)
    expected = [c[0] for c in CASES] + ["vocab-parallel-ce", "invalid-layout"]
    assert all(r == expected for r in results), results
