"""Context parallelism in full train steps (loss normalisation, ZeRO-1 AdamW, clipping, LR
schedule) against plain PyTorch — transformers model on each document alone + torch AdamW — at
CP layouts composed with TP + SP, PP (1F1B), DP with ZeRO-1 and its overlaps and the fused loss.

One spawned world of 8 ranks runs every layout. Rows hold several documents of uneven lengths,
multiples of 2*cp as the loader pads them (tests/test_data_packing.py checks that padding), some
longer than a CP chunk and crossing chunk boundaries, and padding tails.
"""
from __future__ import annotations

import pytest

from tests.layouts import Case, Run, check_case, check_tp_equivalence, train_cases
from tests.multiproc import run_ranks
from tests.oracle import hf_model, packed_batch, reference_training, tiny_fields

RUN = Run(seq=32, rows=4, lr=1e-3, warmup=1, steps=3)
# 8 query heads over 2 kv heads: a2a scatters heads/tp over cp (8/4 at cp 4, 4/2 at tp 2 x cp 2).
FIELDS = tiny_fields(num_attention_heads=8, num_kv_heads=2)
CASES = [
    Case("cp2-ring", (0, 1), cp=2),
    Case("cp2-a2a", (2, 3), cp=2, cp_comm="a2a"),
    Case("cp2-allgather-recompute-full", (4, 5), cp=2, cp_comm="allgather"),
    Case("cp2-ring-recompute-selective", (6, 7), cp=2),
    Case("tp2-cp2-sp-ring", (0, 1, 2, 3), tp=2, cp=2, sequence_parallel=True, micro_batch_size=2),
    Case("cp2-pp2-1f1b-ring", (4, 5, 6, 7), cp=2, pp=2),
    Case("cp2-pp2-zb_h1-ring", (0, 1, 2, 3), cp=2, pp=2, schedule="zb_h1"),
    Case("cp2-pp2-zbv-ring", (4, 5, 6, 7), cp=2, pp=2, virtual=2, schedule="zbv"),
    Case("cp2-pp2-interleaved-a2a", (0, 1, 2, 3), cp=2, pp=2, virtual=2, cp_comm="a2a"),
    Case("cp2-dp2-zero1-overlap-fused-loss-ring", (4, 5, 6, 7), cp=2, fast=True),
    Case("cp4-a2a", (0, 1, 2, 3), cp=4, cp_comm="a2a"),
    Case("cp4-ring", (4, 5, 6, 7), cp=4),
    Case("tp2-cp2-pp2-sp-ring", tuple(range(8)), tp=2, cp=2, pp=2, sequence_parallel=True),
]


def global_batches() -> list[dict]:
    # Lengths are multiples of 8 (2*cp for cp <= 4); a CP chunk at cp 2 is 32/4 = 8 tokens.
    lens = [[16, 8], [24, 8], [32], [8, 8, 16], [8, 24], [16], [8, 8, 8], [24]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, FIELDS["vocab_size"],
                         seed=30 + s) for s in range(RUN.steps)]


def _fields(case: Case) -> dict:
    """Interleaving needs 4 layers for its pp * v = 4 chunks (the reference starts from the same
    4-layer directory); the recompute cases say which in their name."""
    recompute = next((r for r in ("full", "selective") if f"recompute-{r}" in case.name), "none")
    return {**FIELDS, "recompute": recompute, **({"num_layers": 4} if case.virtual > 1 else {})}


def _rank_main(hf_dirs: dict) -> dict:
    return train_cases(CASES, RUN, _fields, lambda case: hf_dirs[_fields(case)["num_layers"]], global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Plain-PyTorch runs of the 2- and 4-layer models, and every case's results."""
    refs, dirs = {}, {}
    for layers in (2, 4):
        model = hf_model({**FIELDS, "num_layers": layers}, seed=7)
        dirs[layers] = str(tmp_path_factory.mktemp(f"hf{layers}"))
        model.save_pretrained(dirs[layers])
        losses = reference_training(model, global_batches(), RUN.lr, RUN.warmup, RUN.steps)
        refs[layers] = (losses, {n: p.detach() for n, p in model.named_parameters()})
    return refs, run_ranks(_rank_main, 8, dirs, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_cp_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref_losses, ref_weights = refs[_fields(case)["num_layers"]]
    check_case(case, per_rank, ref_losses, ref_weights, RUN)


# Model level: one forward/backward of packed rows at cp 2 and 4 vs transformers per document.
MODEL_ROWS, MODEL_SEQ = [[16, 8], [8, 16], [32]], 32     # padding tails of 8 in rows 0 and 1
MODEL_CASES = [(1, False, cp, comm) for cp in (2, 4) for comm in ("ring", "a2a", "allgather")] + \
    [(2, True, 2, "ring"), (2, True, 2, "a2a")]


def _model_main() -> list:
    done = []
    for tp, sp, cp, comm in MODEL_CASES:
        check_tp_equivalence(tp, sp, FIELDS, MODEL_ROWS, MODEL_SEQ, cp=cp, cp_comm=comm)
        done.append((tp, sp, cp, comm))
    return done


def test_cp_logits_loss_grads_match_transformers():
    per_rank = run_ranks(_model_main, 4, timeout=600)
    assert per_rank[0] == MODEL_CASES
