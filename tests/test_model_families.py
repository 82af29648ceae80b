"""Every model family vs transformers, on real gloo processes (one spawned world of 4 ranks).

For each family (megasft.model.families) a transformers model from a random tiny config with the
family's features on (Qwen2 q/k/v biases + tied embeddings, Qwen3 q/k norms, Mistral's sliding
window of 3 tokens, shorter than most documents; Gemma 2 and 3 with a sliding then a full layer,
soft-caps that bend the logits, tied embeddings, Gemma 3's q/k norms and per-layer rope; see
tests.oracle.family_fields) is the reference:

* forward/backward at TP1, TP2 and TP2+SP on packed rows: each document's logits as the
  transformers model gives it alone, the masked loss, every gradient (tests.layouts.check_tp_equivalence);
* three full train steps at one multi-rank layout per family against transformers + torch AdamW
  (tests.oracle.reference_training).
"""
from __future__ import annotations

import pytest

from tests.layouts import Case, Run, check_case, check_tp_equivalence, train_cases
from tests.multiproc import run_ranks
from tests.oracle import family_fields, hf_model, packed_batch, reference_training

ROWS = [[5, 7, 4], [9, 3]]      # two packed rows of 16 tokens; the second ends in padding
SEQ = 16
FAMILIES = ("qwen2", "qwen3", "mistral", "gemma2", "gemma3_text")
# (name, family, tp, sequence_parallel, field overrides)
FORWARD_CASES = [(f"{family}-{name}", family, tp, sp, {}) for family in FAMILIES
                 for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2-sp", 2, True))] + [
    # one kv head for two TP ranks: replicated k/v (and k_norm) copies, each seeing half the queries
    ("qwen3-tp2-sp-kv-replicated", "qwen3", 2, True, dict(num_kv_heads=1)),
    ("mistral-tp2-sp-fused-loss", "mistral", 2, True, dict(loss_chunk_tokens=5)),
    # the final soft-cap inside the fused chunked LM-head loss; the attention core recomputed
    ("gemma2-tp2-sp-fused-loss-softcap", "gemma2", 2, True, dict(loss_chunk_tokens=5)),
    ("gemma2-tp2-recompute-selective", "gemma2", 2, False, dict(recompute="selective")),
    ("gemma3_text-tp2-sp-kv-replicated-fused-loss", "gemma3_text", 2, True, dict(num_kv_heads=1, loss_chunk_tokens=7)),
]

RUN = Run(seq=SEQ, rows=8, lr=1e-3, warmup=1, steps=3)
ALL = (0, 1, 2, 3)
# One multi-rank layout per family; the case name starts with the family.
TRAIN_CASES = [
    Case("qwen2-tp2-sp-dp2-zero1-tied-fast", ALL, tp=2, sequence_parallel=True, micro_batch_size=2, fast=True),
    Case("qwen3-tp2-sp-pp2-qk-norm", ALL, tp=2, pp=2, sequence_parallel=True),
    Case("mistral-tp2-sp-dp2-window-fast", ALL, tp=2, sequence_parallel=True, micro_batch_size=2, fast=True),
    # Gemma 2 with ZeRO-1, the overlaps and the fused loss; Gemma 3's tied embedding split over two
    # pipeline stages, the local-rope layer on the first and the full one on the second
    Case("gemma2-tp2-sp-dp2-zero1-fast", ALL, tp=2, sequence_parallel=True, micro_batch_size=2, fast=True),
    Case("gemma3_text-tp2-sp-pp2-tied-fused-loss", ALL, tp=2, pp=2, sequence_parallel=True, fast=True),
]


def _family(case: Case) -> str:
    return case.name.split("-", 1)[0]


def _fields(case: Case) -> dict:
    return family_fields(_family(case))


def global_batches(vocab: int) -> list[dict]:
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], SEQ, vocab, seed=10 + s)
            for s in range(RUN.steps)]


def _rank_main(hf_dirs: dict) -> dict:
    done = []
    for name, family, tp, sp, overrides in FORWARD_CASES:
        try:
            check_tp_equivalence(tp, sp, family_fields(family, **overrides), ROWS, SEQ)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
        done.append(name)
    trained = {}
    for case in TRAIN_CASES:   # one global-batch stream per family vocabulary
        batches = global_batches(_fields(case)["vocab_size"])
        trained.update(train_cases([case], RUN, _fields, lambda c: hf_dirs[_family(c)], batches))
    return {"forward": done, "trained": trained}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The references (one transformers model per family) and every rank's results, once."""
    root = tmp_path_factory.mktemp("families")
    references, hf_dirs = {}, {}
    for case in TRAIN_CASES:
        family, fields = _family(case), _fields(case)
        model = hf_model(fields, seed=5)
        hf_dirs[family] = str(root / family)
        model.save_pretrained(hf_dirs[family])
        losses = reference_training(model, global_batches(fields["vocab_size"]), RUN.lr, RUN.warmup, RUN.steps)
        references[family] = (losses, {n: p.detach() for n, p in model.named_parameters()})
    return references, run_ranks(_rank_main, 4, hf_dirs, timeout=600)


def test_forward_backward_matches_transformers_at_tp1_tp2_sp(ran):
    _, per_rank = ran
    for result in per_rank:
        assert result["forward"] == [c[0] for c in FORWARD_CASES], result["forward"]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
def test_train_steps_match_plain_pytorch(ran, case):
    references, per_rank = ran
    ref_losses, ref_weights = references[_family(case)]
    check_case(case, [r["trained"] for r in per_rank], ref_losses, ref_weights, RUN)
