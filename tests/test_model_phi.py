"""Phi-3 / Phi-4 (transformers Phi3ForCausalLM) vs transformers, on real gloo processes (one
spawned world of 4 ranks).

The references are transformers Phi3ForCausalLM models from random tiny configs, whose
checkpoints fuse q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj`` (megasft splits them
on load; the reference gradients and weights are split by transformers' own slicing,
tests.oracle.canonical_reference). Two configs: a sliding window of 3 tokens with the default
rope, and the same window with longrope (tests.oracle.PHI3_LONGROPE: partial rotation 0.5,
L0 = 8, attention factor sqrt 2), whose packed rows hold documents of 9, 12 and 16 tokens —
longer than L0, so transformers (run on each document alone) switches them to long_factor,
and shorter ones, which keep short_factor.

* forward/backward at TP1, TP2 and TP2+SP (and at TP2+SP one kv head replicated, tied embeddings,
  the fused chunked loss): each document's logits as transformers gives it alone (max abs diff < 1e-4), the masked loss, every gradient;
* three full train steps at TP2 x PP2 + SP from the HF directory (init_from_hf splits the fused
  tensors per pipeline chunk) against transformers + torch AdamW.
"""
from __future__ import annotations

import pytest

from tests.layouts import Case, Run, check_case, check_tp_equivalence, train_cases
from tests.multiproc import run_ranks
from tests.oracle import PHI3_LONGROPE, canonical_reference, family_fields, hf_model, packed_batch, reference_training

ROWS = [[5, 7, 4], [9, 3], [12, 4], [16]]     # packed rows of 16 tokens; documents of 9, 12, 16 > L0
SEQ = 16
CONFIGS = {"window": family_fields("phi3"), "longrope": family_fields("phi3", **PHI3_LONGROPE)}
FORWARD_CASES = [(f"{config}-{name}", CONFIGS[config], tp, sp) for config in CONFIGS
                 for name, tp, sp in (("tp1", 1, False), ("tp2", 2, False), ("tp2-sp", 2, True))] + [
    # one kv head for two TP ranks: each rank's k and v rows come from the split qkv_proj
    ("longrope-tp2-sp-kv-replicated", family_fields("phi3", num_kv_heads=1, **PHI3_LONGROPE), 2, True),
    # Phi-4-mini's shape: longrope, partial rotation and tied embeddings
    ("longrope-tp2-sp-tied", family_fields("phi3", tie_embeddings=True, **PHI3_LONGROPE), 2, True),
    ("longrope-tp2-sp-fused-loss", family_fields("phi3", loss_chunk_tokens=5, **PHI3_LONGROPE), 2, True),
]

RUN = Run(seq=SEQ, rows=8, lr=1e-3, warmup=1, steps=3)
TRAIN = Case("phi3-longrope-tp2-sp-pp2", (0, 1, 2, 3), tp=2, pp=2, sequence_parallel=True)


def global_batches() -> list[dict]:
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], SEQ, 300, seed=10 + s)
            for s in range(RUN.steps)]


def _rank_main(hf_dir: str) -> dict:
    done = []
    for name, fields, tp, sp in FORWARD_CASES:
        try:
            check_tp_equivalence(tp, sp, fields, ROWS, SEQ)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
        done.append(name)
    trained = train_cases([TRAIN], RUN, lambda c: CONFIGS["longrope"], lambda c: hf_dir, global_batches())
    return {"forward": done, "trained": trained}


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    model = hf_model(CONFIGS["longrope"], seed=5)
    hf_dir = str(tmp_path_factory.mktemp("phi3") / "hf")
    model.save_pretrained(hf_dir)
    losses = reference_training(model, global_batches(), RUN.lr, RUN.warmup, RUN.steps)
    return (losses, canonical_reference(model)), run_ranks(_rank_main, 4, hf_dir, timeout=600)


def test_forward_backward_matches_transformers_at_tp1_tp2_sp(ran):
    _, per_rank = ran
    for result in per_rank:
        assert result["forward"] == [c[0] for c in FORWARD_CASES], result["forward"]


def test_train_steps_match_plain_pytorch(ran):
    (ref_losses, ref_weights), per_rank = ran
    check_case(TRAIN, [r["trained"] for r in per_rank], ref_losses, ref_weights, RUN)
