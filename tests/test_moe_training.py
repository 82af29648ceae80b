"""Mixture-of-experts training steps (Qwen3-MoE, Mixtral) against plain PyTorch: transformers' model
+ torch.optim.AdamW (same param groups) + clip_grad_norm_ + LambdaLR, minimising the global-token
SFT loss plus the weighted mean over micro-batches of transformers' load-balancing loss (and the
z-loss). Weights after 3 steps, the SFT losses, the logged aux losses and the logged expert load
must agree at tp 1 and tp 2 (+SP), with DP and ZeRO-1, and with expert parallelism (ep 2 and 4,
with ZeRO-1 of the experts over the dp / ep ranks holding them, or a replicated optimizer), over
pipeline stages (1F1B, ZB-H1, interleaved, ZBV: the load-balancing loss pools the routers of every
stage, megasft.training.moe_aux) and context parallelism (cp 2, whose ranks pool their tokens'),
with EP groups inside the CP group or spanning CP and DP ranks.

The aux loss is per micro-batch, so the reference depends on how a step's rows are cut into
micro-batches: rows go to DP ranks in contiguous shares and are cut into micro-batches of
micro_batch_size rows there, which is the same partition of the global batch at any DP size — one
reference per (model, micro_batch_size). Documents and padding tails are multiples of 2*cp = 4
tokens, so the CP case trains the same rows as the others.

One spawned world of 4 ranks runs every case; each case is its own test item.
"""
from __future__ import annotations

import pytest
import torch

from tests.layouts import Case, Run, check_case, train_cases
from tests.multiproc import run_ranks
from tests.oracle import canonical_reference, hf_model, moe_fields, packed_batch, reference_moe_training

pytest.importorskip("transformers")

RUN = Run(seq=16, rows=4, lr=1e-3, warmup=1, steps=3)
MIN_GAP = 1e-3     # as tests.test_moe: the k-th and (k+1)-th router logits of every token stay apart
CASES = [
    Case("qwen3moe-tp1-mb1", (0,)),
    Case("qwen3moe-tp1-mb2", (1,), micro_batch_size=2),
    Case("qwen3moe-tp2-mb1", (2, 3), tp=2),
    Case("qwen3moe-tp2-dp2-zero1-sp-mb2", (0, 1, 2, 3), tp=2, micro_batch_size=2, sequence_parallel=True),
    Case("mixtral-tp1-dp2-zero1-mb1", (0, 1)),
    Case("mixtral-tp2-dp2-zero1-overlap-fused-loss-mb1", (0, 1, 2, 3), tp=2, fast=True),
    # Expert parallelism: experts over 2 of the dp ranks; at dp 4 their ZeRO-1 state over the other 2.
    Case("qwen3moe-ep2-dp2-zero1-mb1", (0, 1, 2, 3), ep=2),
    Case("qwen3moe-ep2-replicated-optimizer-mb2", (0, 1), ep=2, micro_batch_size=2, zero1=False),
    Case("mixtral-tp2-ep2-zero1-overlap-fused-loss-sp-mb1", (0, 1, 2, 3), tp=2, ep=2, fast=True, sequence_parallel=True),
    Case("mixtral-ep4-zero1-mb1", (0, 1, 2, 3), ep=4),
    # Pipelines: Qwen3-MoE's stages are layers 0 (MoE) and 1 (dense) | layer 2 (MoE).
    Case("qwen3moe-ep2-pp2-1f1b-mb1", (0, 1, 2, 3), pp=2, ep=2, pipeline_layers=(2, 1)),
    Case("mixtral-tp2-pp2-zb_h1-sp-mb1", (0, 1, 2, 3), tp=2, pp=2, schedule="zb_h1", sequence_parallel=True),
    Case("mixtral4-pp2-interleaved-v2-mb1", (0, 1), pp=2, virtual=2),
    Case("mixtral4-pp2-zbv-mb1", (2, 3), pp=2, virtual=2, schedule="zbv"),
    # CP: expert parallelism folds into dp x cp (CP fastest). At cp2 dp2 ep2 the EP group is the CP
    # group and the experts' ZeRO-1 state is sharded over dp; at ep4 the EP group spans both.
    Case("qwen3moe-cp2-ep2-mb1", (0, 1, 2, 3), cp=2, ep=2),
    Case("mixtral-cp2-a2a-ep4-zero1-mb1", (0, 1, 2, 3), cp=2, cp_comm="a2a", ep=4),   # a2a: Mixtral has a window
]
# A case's model is the prefix of its name; mixtral4 is Mixtral with 4 layers, one per virtual stage.
MODELS = {"qwen3moe": moe_fields("qwen3_moe"), "mixtral": moe_fields("mixtral"),
          "mixtral4": moe_fields("mixtral", num_layers=4)}


def _model(case: Case) -> str:
    return case.name.split("-")[0]


def global_batches() -> list[dict]:
    lens = [[4, 8], [8, 4], [16], [4, 4, 4], [12], [8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, 300, seed=10 + s)
            for s in range(RUN.steps)]


def _rank_main(hf_dirs: dict) -> dict:
    return train_cases(CASES, RUN, lambda case: MODELS[_model(case)], lambda case: hf_dirs[_model(case)],
                       global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Every reference run (per model and micro-batch size) and every case's results, once."""
    root = tmp_path_factory.mktemp("hf")
    hf_dirs, refs = {}, {}
    for name, fields in MODELS.items():
        hf_dirs[name] = str(root / name)
        hf_model(fields, seed=5).save_pretrained(hf_dirs[name])
        for mb in sorted({c.micro_batch_size for c in CASES if _model(c) == name}):
            model = hf_model(fields, seed=5)
            ref = reference_moe_training(model, global_batches(), RUN.lr, RUN.warmup, RUN.steps, mb,
                                         fields["moe_aux_loss_coef"], fields["moe_z_loss_coef"])
            assert ref["min_gap"] > MIN_GAP, f"{name}: near-tie in routing, gap {ref['min_gap']:.2g}"
            refs[name, mb] = ref, canonical_reference(model)
    return refs, run_ranks(_rank_main, 4, hf_dirs, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_moe_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref, weights = refs[_model(case), case.micro_batch_size]
    check_case(case, per_rank, ref["losses"], weights, RUN)
    for out in (r[case.name] for r in per_rank if case.name in r):
        # the mean over micro-batches of fp32 sums of O(1) terms: rounding ~1e-7 relative
        assert torch.allclose(torch.tensor(out["aux"]), torch.tensor(ref["aux"]), rtol=1e-5), (out["aux"], ref["aux"])
        # The norm of every (dense, expert-parallel, TP-split) gradient counted once: the norms are
        # O(10) here, so clipping acts, but Adam is nearly blind to a norm wrong by a constant
        # factor; checked directly. Summation order moves it by ~1e-6 relative.
        assert torch.allclose(torch.tensor(out["grad_norms"]), torch.tensor(ref["grad_norms"]), rtol=1e-4), \
            (out["grad_norms"], ref["grad_norms"])
        record = out["moe_record"]
        load = {layer: tokens for layer, tokens in zip(record["expert_load"], ref["load"].tolist())}
        assert record["expert_load"] == load, "tokens per expert over the 3 steps differ from the reference's"
        assert record["expert_imbalance_max"] == max(record["expert_imbalance"].values()) >= 1.0
