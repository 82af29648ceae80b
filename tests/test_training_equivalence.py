"""Full train steps (loss normalisation, ZeRO-1 AdamW, clipping, LR schedule) at several layouts
against plain PyTorch: transformers model + torch.optim.AdamW + clip_grad_norm_ + LambdaLR.
Two layouts also turn on the performance options (overlapped grad reduce-scatter and param
all-gather, fused chunked loss).

One spawned world of 4 ranks runs every layout (layouts smaller than 4 ranks use a subset); each
layout is then its own test item, so a failing layout is reported by name beside the others.
"""
from __future__ import annotations

import pytest

from tests.layouts import Case, Run, check_case, train_cases
from tests.multiproc import run_ranks
from tests.oracle import hf_model, packed_batch, reference_training, tiny_fields

RUN = Run(seq=16, rows=8, lr=1e-3, warmup=1, steps=3)
CASES = [
    Case("tp1-dp1-mb1", (0,)),
    Case("tp1-dp1-mb8", (0,), micro_batch_size=8),
    Case("tp2-dp1-mb4", (0, 1), tp=2, micro_batch_size=4),
    Case("tp1-dp2-zero1-mb1", (0, 1)),
    Case("tp1-dp2-zero1-overlap-fused-loss-mb2", (2, 3), micro_batch_size=2, fast=True),
    Case("tp1-dp4-zero1-mb2", (0, 1, 2, 3), micro_batch_size=2),
    Case("tp2-dp2-zero1-sp-mb4", (0, 1, 2, 3), tp=2, micro_batch_size=4, sequence_parallel=True),
    Case("tp2-dp2-zero1-sp-overlap-fused-loss-mb2", (0, 1, 2, 3), tp=2, micro_batch_size=2,
         sequence_parallel=True, fast=True),
    Case("tp2-dp2-replicated-mb1", (0, 1, 2, 3), tp=2, zero1=False),
]


def global_batches() -> list[dict]:
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, 1003, seed=10 + s)
            for s in range(RUN.steps)]


def _fields(case: Case) -> dict:
    return tiny_fields()


def _rank_main(hf_dir: str) -> dict:
    return train_cases(CASES, RUN, _fields, lambda case: hf_dir, global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The reference run and every case's results, computed once for the module."""
    hf_dir = tmp_path_factory.mktemp("hf")
    model = hf_model(tiny_fields(), seed=5)
    model.save_pretrained(hf_dir)
    ref_losses = reference_training(model, global_batches(), RUN.lr, RUN.warmup, RUN.steps)
    assert ref_losses[0] > ref_losses[-1] - 1.0   # sanity: the reference really trained
    per_rank = run_ranks(_rank_main, 4, str(hf_dir), timeout=600)
    return ref_losses, {n: p.detach() for n, p in model.named_parameters()}, per_rank


@pytest.mark.parametrize("case", CASES, ids=str)
def test_train_steps_match_plain_pytorch(trained, case):
    ref_losses, ref_weights, per_rank = trained
    check_case(case, per_rank, ref_losses, ref_weights, RUN)
