"""Optimizer steps through the pipeline schedules against plain PyTorch: transformers model +
torch.optim.AdamW (decay 0.1 on >=2-D params only, betas (0.9, 0.95), eps 1e-8) +
clip_grad_norm_(1.0) + the same LR schedule. Layouts: 1F1B and interleaved at PP=2 and PP=4,
PP2xDP2 and TP2xSPxPP2xDP2 with ZeRO-1, tied embeddings, and one layout with the performance
options on (overlapped grad reduce-scatter and param all-gather, fused chunked loss).

One spawned world of 8 ranks runs every layout (smaller layouts use a subset of it). After 2 steps
every weight piece of every stage must equal the reference, and a tied embedding's two copies
(first and last stage) must be bit-identical.
"""
from __future__ import annotations

import torch

from megasft.parallel_state import ParallelState
from megasft.pipeline.tied import tied_copies
from tests.layouts import assert_losses_match, assert_pieces_match, sft_config, train_layout
from tests.multiproc import run_ranks
from tests.oracle import hf_model, packed_batch, reference_training, tiny_fields

STEPS, SEQ, ROWS = 2, 16, 8
LR, WARMUP = 1e-3, 1
# (name, ranks, tp, pp, virtual chunks, schedule, micro_batch_size, sequence parallel, tied, fast options)
LAYOUTS = [
    ("tp2-pp2-dp2-zero1-sp-interleaved", list(range(8)), 2, 2, 2, "interleaved", 1, True, False, False),
    ("pp2-dp2-zero1-1f1b", [0, 1, 2, 3], 1, 2, 1, "1f1b", 1, False, False, False),
    ("pp4-1f1b-mb2", [4, 5, 6, 7], 1, 4, 1, "1f1b", 2, False, False, False),
    ("pp2-interleaved", [0, 1], 1, 2, 2, "interleaved", 1, False, False, False),
    ("pp2-dp2-zero1-interleaved-tied", [0, 1, 2, 3], 1, 2, 2, "interleaved", 1, False, True, False),
    ("pp4-interleaved-tied", [4, 5, 6, 7], 1, 4, 2, "interleaved", 1, False, True, False),
    ("pp2-1f1b-tied", [0, 1], 1, 2, 1, "1f1b", 2, False, True, False),
    ("pp2-dp2-zero1-1f1b-tied-overlap-fused-loss", [4, 5, 6, 7], 1, 2, 1, "1f1b", 1, False, True, True),
]
FIELDS = dict(num_layers=8)


def global_batches() -> list[dict]:
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(ROWS)], SEQ, 1003, seed=20 + s)
            for s in range(STEPS)]


def _rank_main(hf_dirs: dict) -> dict:
    results = {}
    for name, ranks, tp, pp, v, schedule, mbs, sp, tied, fast in LAYOUTS:
        ps = ParallelState.build(tp, pp, ranks=ranks)
        if ps is None:
            continue
        parallel = {"tp": tp, "pp": pp, "virtual_pipeline_size": v, "pipeline_schedule": schedule,
                    "sequence_parallel": sp, "distributed_optimizer": True}
        fields = tiny_fields(**FIELDS, tie_embeddings=tied)
        cfg = sft_config(fields, hf_dirs[tied], len(ranks), parallel, SEQ, ROWS, mbs, LR, WARMUP, STEPS, fast)
        trainer, losses, weights = train_layout(cfg, ps, global_batches(), fast)
        copies = [p.detach().clone() for p in tied_copies(trainer.params)]
        results[name] = {"losses": losses, "weights": weights, "tied": copies,
                         "pp_rank": ps.pp_rank, "coords": (ps.dp_rank, ps.tp_rank)}
    return results


def test_pipeline_train_steps_match_plain_pytorch(tmp_path):
    refs, dirs = {}, {}
    for tied in (False, True):
        model = hf_model(tiny_fields(**FIELDS, tie_embeddings=tied), seed=7)
        dirs[tied] = str(tmp_path / f"hf-tied{int(tied)}")
        model.save_pretrained(dirs[tied])
        losses = reference_training(model, global_batches(), LR, WARMUP, STEPS)
        refs[tied] = (losses, {n: p.detach() for n, p in model.named_parameters()})

    per_rank = run_ranks(_rank_main, 8, dirs, timeout=900)
    checked = {}
    for name, ranks, tp, pp, v, schedule, mbs, sp, tied, _ in LAYOUTS:
        ref_losses, ref = refs[tied]
        outs = [r[name] for r in per_rank if name in r]
        assert len(outs) == len(ranks), f"{name}: ran on {len(outs)} ranks"
        seen = set()
        for out in outs:
            assert_losses_match(out["losses"], ref_losses, name)
            seen |= assert_pieces_match(out["weights"], ref, name, atol=5e-5)   # 5 % of one update
        assert seen == set(ref), f"{name}: weights not checked: {set(ref) - seen}"
        if tied:
            first = {o["coords"]: o["tied"] for o in outs if o["pp_rank"] == 0}
            last = {o["coords"]: o["tied"] for o in outs if o["pp_rank"] == pp - 1}
            assert first.keys() == last.keys() and len(first) == len(ranks) // pp
            for coords, copies in first.items():   # same (dp, tp) coordinates on both stages
                assert len(copies) == len(last[coords]) == 1 and torch.equal(copies[0], last[coords][0]), \
                    f"{name}: tied embedding copies differ after {STEPS} steps at (dp, tp) {coords}"
        checked[name] = True
    assert set(checked) == {layout[0] for layout in LAYOUTS}
