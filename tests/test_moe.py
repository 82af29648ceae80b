"""Mixture-of-experts layers (Qwen3-MoE, Mixtral) against transformers, on real gloo processes.

For each case megasft runs a packed batch at tp 1 / tp 2 / tp 2 + SP, and transformers' own
Qwen3MoeForCausalLM / MixtralForCausalLM (eager expert loop) runs every segment of it alone: the
router logits of every layer, the expert load, the logits of every document, the SFT loss, the
load-balancing loss (transformers' load_balancing_loss_func), the z-loss and every parameter's
gradient of SFT + aux_coef * aux + z_coef * z must agree.

Expert parallelism (ep 2 and 4, and tp 2 x ep 2): each of the ep data-parallel ranks runs a batch
of its own and holds num_experts / ep experts, tokens travelling to their experts by all-to-all.
The reference objective is the sum over ranks of (rank's SFT loss sum / all ranks' trained tokens
+ the aux terms of the rank's micro-batch), as data-parallel training forms it; dense gradients
are summed over the dp ranks as the optimizer would, expert gradients (already holding every
rank's tokens through the all-to-all backward) must equal the reference's for the experts held.

Identical top-k selection: random weights make exact ties measure-zero; each case asserts that
the reference's k-th and (k+1)-th router logits are at least MIN_GAP apart for every token and
layer, and that megasft's router logits equal the reference's within LOGIT_TOL, far below it —
so both pick the same experts (then the expert loads must match exactly, which is checked too).

The same world also runs DeepSeek-V3's MoE layer against transformers' DeepseekV3MoE at expert-TP 2,
with and without SP (tests.test_moe_deepseek has the check and its tolerances; tp=1 runs there).
"""
from __future__ import annotations

import re

import pytest
import torch
from torch.testing import assert_close

from megasft.config import ModelConfig
from megasft.hf.names import canonical_pieces, load_canonical
from megasft.model.llama import LlamaStage
from megasft.model.moe import Router
from megasft.parallel_state import ParallelState
from megasft.tensor_parallel.comm import all_gather_dim0, all_reduce, gather_last_dim
from megasft.tensor_parallel.layers import sync_replicated_grads
from megasft.tensor_parallel.spec import spec_of
from tests.layouts import assert_grads_match
from tests.multiproc import run_ranks
from tests.oracle import canonical_reference, hf_model, model_batch, moe_fields, packed_batch, reference_moe
from tests.test_moe_deepseek import check_layer_matches_transformers

pytest.importorskip("transformers")

# (name, family, tp, sequence_parallel, model field overrides, ep)
CASES = [
    ("qwen3moe-tp1", "qwen3_moe", 1, False, {}, 1),
    ("qwen3moe-tp2", "qwen3_moe", 2, False, {}, 1),
    ("qwen3moe-tp2-sp", "qwen3_moe", 2, True, {}, 1),
    ("qwen3moe-tp2-grouped-mm-recompute", "qwen3_moe", 2, False,
     dict(moe_experts_backend="grouped_mm", recompute="full"), 1),
    ("mixtral-tp1", "mixtral", 1, False, {}, 1),
    ("mixtral-tp2-sp", "mixtral", 2, True, {}, 1),
    ("qwen3moe-ep2", "qwen3_moe", 1, False, {}, 2),
    ("qwen3moe-ep4", "qwen3_moe", 1, False, {}, 4),
    ("qwen3moe-tp2-ep2-sp-grouped-mm", "qwen3_moe", 2, True, dict(moe_experts_backend="grouped_mm"), 2),
    ("mixtral-ep2-recompute", "mixtral", 1, False, dict(recompute="full"), 2),
    ("mixtral-ep4", "mixtral", 1, False, {}, 4),
    ("mixtral-tp2-ep2", "mixtral", 2, False, {}, 2),
]
EXPERT = re.compile(r"\.experts\.\d+\.")
DEEPSEEK_CASES = [("deepseek-layer-tp2", False), ("deepseek-layer-tp2-sp", True)]   # (name, sequence_parallel)
ROWS = [[5, 7, 4], [9, 3]]      # two packed rows of 16 tokens; the second ends in padding
SEQ = 16
SEEDS = (2, 3, 5, 7)     # one batch per dp rank, seeds whose routing has no near-tie (gap > MIN_GAP)
MIN_GAP = 1e-3      # router logits are O(4); fp32 rounding of megasft vs transformers is ~1e-6
LOGIT_TOL = 1e-5


def _capture_router_logits(stage) -> list:
    """Each Router's logits of every forward, in layer order (a test-side hook)."""
    seen = []
    for module in stage.modules():
        if isinstance(module, Router):
            module.register_forward_hook(lambda m, args, out: seen.append(out[0].detach()))
    return seen


def _check_case(family: str, tp: int, sp: bool, overrides: dict, ep: int) -> None:
    ps = ParallelState.build(tp, 1, ranks=list(range(tp * ep)), ep=ep)
    if ps is None:
        return
    fields = moe_fields(family, **overrides)
    hf = hf_model(fields, seed=1)
    aux_coef, z_coef = fields["moe_aux_loss_coef"], fields["moe_z_loss_coef"]
    batches = [packed_batch(ROWS, SEQ, fields["vocab_size"], seed=s) for s in SEEDS[:ep]]   # one per dp rank
    refs = [reference_moe(hf, b, micro_batch_size=len(ROWS)) for b in batches]   # each batch: one micro-batch
    tokens = sum(r["count"] for r in refs)
    for r in refs:
        assert r["min_gap"] > MIN_GAP, f"test batch has a near-tie in routing: gap {r['min_gap']:.2g}"
    sum(r["loss_sum"] / tokens + aux_coef * r["aux"][0] + z_coef * r["z"][0] for r in refs).backward()
    batch, ref = batches[ps.dp_rank], refs[ps.dp_rank]
    ref_aux, ref_z = ref["aux"][0], ref["z"][0]

    stage = LlamaStage(ModelConfig(**fields), ps, list(range(fields["num_layers"])), True, True, sequence_parallel=sp)
    weights = canonical_reference(hf)
    load_canonical(stage, lambda name, shape: weights[name])
    router_logits = _capture_router_logits(stage)
    mb = model_batch(batch)
    b = len(ROWS)
    with torch.no_grad():   # logits and packing isolation: every document as if alone
        logits = gather_last_dim(stage(mb.without_labels()), ps.tp_group)              # [s, b, V]
        for (r, start, n), expected in zip(batch["docs"], ref["logits"]):
            got = logits[start:start + n, r, :fields["vocab_size"]]
            assert (got - expected).abs().max() < 1e-4, f"logits differ for document at row {r}+{start}"
    router_logits.clear()

    loss_sum, count, moe = stage(mb)
    for layer, (got, expected) in enumerate(zip(router_logits, ref["router_logits"][0])):
        got = all_gather_dim0(got.view(-1, b, got.shape[-1]), ps.tp_group if sp else None)   # [s, b, E]
        got = got.transpose(0, 1).reshape(-1, got.shape[-1])      # the reference's row-major token order
        assert (got - expected).abs().max() < LOGIT_TOL, f"router logits of MoE layer {layer} differ"
        expected_load = torch.bincount(expected.topk(fields["moe_top_k"]).indices.reshape(-1),
                                       minlength=fields["num_experts"]).float()
        assert torch.equal(moe.load[layer], expected_load), f"expert load of MoE layer {layer}"
    assert len(router_logits) == len(ref["router_logits"][0]) == moe.load.shape[0]
    assert int(count) == ref["count"]
    assert_close(loss_sum, ref["loss_sum"].detach(), rtol=1e-5, atol=1e-5)
    assert_close(moe.aux, ref_aux.detach(), rtol=1e-5, atol=1e-6)
    assert_close(moe.z, ref_z.detach(), rtol=1e-5, atol=1e-5)
    (loss_sum / tokens + aux_coef * moe.aux + z_coef * moe.z).backward()
    sync_replicated_grads(stage.parameters(), lambda p: p.grad)
    for p in stage.parameters():     # what the optimizer's reduction does: dense grads over dp
        if spec_of(p).experts is None:
            all_reduce(p.grad, ps.dp_group)
    held, all_grads = {name for name, *_ in canonical_pieces(stage)}, canonical_reference(hf, grads=True)
    experts = {n for n in all_grads if EXPERT.search(n)}
    assert len(held & experts) * ep == len(experts), "each EP rank holds num_experts / ep experts"
    assert_grads_match(stage, {n: g for n, g in all_grads.items() if n in held or n not in experts})


def _rank_main() -> list[str]:
    done = []
    for name, family, tp, sp, overrides, ep in CASES:
        try:
            _check_case(family, tp, sp, overrides, ep)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
        done.append(name)
    for name, sp in DEEPSEEK_CASES:
        try:
            ps = ParallelState.build(2, 1, ranks=[0, 1])
            if ps is not None:
                check_layer_matches_transformers(ps, sp)
        except AssertionError as err:
            raise AssertionError(f"case {name}: {err}") from err
        done.append(name)
    return done


def test_moe_matches_transformers():
    results = run_ranks(_rank_main, 4, timeout=400)
    assert results[0] == [name for name, *_ in CASES] + [name for name, _ in DEEPSEEK_CASES]


def _aux_gradient_share(family: str) -> float:
    """|d(aux_coef * aux + z_coef * z)/d router| / |d total/d router| of the first MoE layer."""
    fields = moe_fields(family)
    hf = hf_model(fields, seed=1)
    ref = reference_moe(hf, packed_batch(ROWS, SEQ, fields["vocab_size"], seed=2), len(ROWS))
    router = next(p for n, p in hf.named_parameters() if n.endswith("mlp.gate.weight"))
    aux = fields["moe_aux_loss_coef"] * ref["aux"][0] + fields["moe_z_loss_coef"] * ref["z"][0]
    (g_aux,) = torch.autograd.grad(aux, router, retain_graph=True)
    (g_all,) = torch.autograd.grad(ref["loss_sum"] / ref["count"] + aux, router)
    return float(g_aux.norm() / g_all.norm())


@pytest.mark.quick
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_aux_losses_carry_a_visible_share_of_the_router_gradient(family):
    """The test models' aux weights make the auxiliary losses' part of the router gradient far
    above the 1e-5 tolerance the gradient comparison allows, so a dropped or mis-scaled aux term
    fails test_moe_matches_transformers."""
    assert _aux_gradient_share(family) > 1e-2
