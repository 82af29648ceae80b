"""Optimizer steps through the pipeline schedules against plain PyTorch: transformers model +
torch.optim.AdamW (decay 0.1 on >=2-D params only, betas (0.9, 0.95), eps 1e-8) +
clip_grad_norm_(1.0) + the same LR schedule. Layouts: 1F1B and interleaved at PP=2 and PP=4,
PP2xDP2 and TP2xSPxPP2xDP2 with ZeRO-1, tied embeddings, and one layout with the performance
options on (overlapped grad reduce-scatter and param all-gather, fused chunked loss).

One spawned world of 8 ranks runs every layout (smaller layouts use a subset of it); each layout is
then its own test item. After 2 steps every weight piece of every stage must equal the reference,
and a tied embedding's two copies (first and last stage) must be bit-identical.
"""
from __future__ import annotations

import pytest
import torch

from tests.layouts import Case, Run, check_case, tied_and_untied_references, train_cases
from tests.multiproc import run_ranks
from tests.oracle import packed_batch, tiny_fields

RUN = Run(seq=16, rows=8, lr=1e-3, warmup=1, steps=2)
FIRST, LAST = (0, 1, 2, 3), (4, 5, 6, 7)
CASES = [
    Case("tp2-pp2-dp2-zero1-sp-interleaved", tuple(range(8)), tp=2, pp=2, virtual=2,
         schedule="interleaved", sequence_parallel=True),
    Case("pp2-dp2-zero1-1f1b", FIRST, pp=2, schedule="1f1b"),
    Case("pp4-1f1b-mb2", LAST, pp=4, schedule="1f1b", micro_batch_size=2),
    Case("pp2-interleaved", (0, 1), pp=2, virtual=2, schedule="interleaved"),
    Case("pp2-dp2-zero1-interleaved-tied", FIRST, pp=2, virtual=2, schedule="interleaved", tied=True),
    Case("pp4-interleaved-tied", LAST, pp=4, virtual=2, schedule="interleaved", tied=True),
    Case("pp2-1f1b-tied", (0, 1), pp=2, schedule="1f1b", micro_batch_size=2, tied=True),
    Case("pp2-dp2-zero1-1f1b-tied-overlap-fused-loss", LAST, pp=2, schedule="1f1b", tied=True, fast=True),
]
FIELDS = dict(num_layers=8)


def global_batches() -> list[dict]:
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, 1003, seed=20 + s)
            for s in range(RUN.steps)]


def _fields(case: Case) -> dict:
    return tiny_fields(**FIELDS, tie_embeddings=case.tied)


def _rank_main(hf_dirs: dict) -> dict:
    return train_cases(CASES, RUN, _fields, lambda case: hf_dirs[case.tied], global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The two reference runs (untied, tied) and every case's results, computed once."""
    refs, dirs = tied_and_untied_references(tmp_path_factory.mktemp("hf"), FIELDS, global_batches(), RUN, seed=7)
    return refs, run_ranks(_rank_main, 8, dirs, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_pipeline_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref_losses, ref_weights = refs[case.tied]
    check_case(case, per_rank, ref_losses, ref_weights, RUN)
    if case.tied:
        outs = [r[case.name] for r in per_rank if case.name in r]
        first = {o["coords"]: o["tied"] for o in outs if o["pp_rank"] == 0}
        last = {o["coords"]: o["tied"] for o in outs if o["pp_rank"] == case.pp - 1}
        assert first.keys() == last.keys() and len(first) == len(case.ranks) // case.pp
        for coords, copies in first.items():   # same (dp, tp) coordinates on both stages
            assert len(copies) == len(last[coords]) == 1 and torch.equal(copies[0], last[coords][0]), \
                f"{case}: tied embedding copies differ after {RUN.steps} steps at (dp, tp) {coords}"
