"""ZB-H1, the zero-bubble pipeline schedule (megasft.pipeline.zero_bubble, weight_grad).

Its pass orders are checked as data (every pass once, F before B before W, the unit-cost timeline
replays without deadlock, bubble and memory as the paper's formulas); the split backward against
autograd; and optimizer steps through it against plain PyTorch (transformers + torch AdamW, as
tests/test_pipeline_training.py) at PP2, PP4, TP2xSPxPP2 with full recompute, and PP2xDP2 ZeRO-1
with overlapped grad reduce / param gather, the fused chunked loss and tied embeddings.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megasft.config import Config
from megasft.errors import ConfigError
from megasft.layout import ZB_H1, Layout, bubble_fraction
from megasft.pipeline.weight_grad import DeferredWeightGemm, WeightGradStore
from megasft.pipeline.zero_bubble import (B_PASS, F_PASS, W_PASS, _timeline_length, peak_in_flight,
                                          simulated_bubble, zb_h1_orders)
from tests.layouts import Case, Run, check_case, tied_and_untied_references, train_cases
from tests.multiproc import run_ranks
from tests.oracle import packed_batch, tiny_fields


# ------------------------------------------------------------------------------ the orders
@pytest.mark.parametrize("p", [2, 3, 4, 8])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8, 16])
def test_orders_run_every_pass_once_in_order_without_deadlock(p, m):
    orders = zb_h1_orders(p, m)
    for r, order in enumerate(orders):
        for kind in (F_PASS, B_PASS, W_PASS):
            assert [k for x, k in order if x == kind] == list(range(m)), f"stage {r}: {kind} passes"
        position = {pass_: i for i, pass_ in enumerate(order)}
        assert all(position[(F_PASS, k)] < position[(B_PASS, k)] < position[(W_PASS, k)] for k in range(m))
        assert peak_in_flight(p, r, m) <= min(p, m)    # never more held than 1F1B's first stage
    finish = _timeline_length(orders, p, m)            # raises if the orders deadlock
    assert finish >= 3 * m + p - 1                     # the critical path of one micro-batch's F and B


@pytest.mark.parametrize("p, m", [(2, 2), (2, 8), (4, 4), (4, 8), (4, 16), (8, 8), (8, 32)])
def test_bubble_is_a_third_of_one_f_one_b(p, m):
    """Qi et al. 2023 (F = B = W): ZB-H1 idles (p-1)(F+B-W) where 1F1B idles (p-1)(F+B+W)."""
    assert simulated_bubble(p, m) == pytest.approx((p - 1) / (3 * m + p - 1))
    one_f_one_b_idle = 3 * (p - 1)          # in units of one pass, over a step of 3m busy units
    zb_idle = simulated_bubble(p, m) * 3 * m / (1 - simulated_bubble(p, m))
    assert zb_idle == pytest.approx(one_f_one_b_idle / 3)
    assert bubble_fraction(ZB_H1, p, m) == simulated_bubble(p, m)


def test_zb_h1_config_rules():
    def cfg(**parallel):
        return Config.from_dict({"model": {"preset": "tiny"}, "data": {"seq_len": 64, "global_batch_tokens": 512},
                                 "parallel": {"pp": 2, "pipeline_schedule": "zb_h1", **parallel}}).validate()
    layout = Layout.resolve(cfg(), 2)
    assert layout.schedule == ZB_H1 and layout.in_flight(1) == 2      # 8 rows: m = 8, held <= p
    with pytest.raises(ConfigError, match="one model chunk per rank"):
        Layout.resolve(cfg(virtual_pipeline_size=2), 2)


# ------------------------------------------------------------------------------ the split backward
def test_deferred_weight_gradient_equals_autograd_and_fires_accumulation_hooks():
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(6, 8))
    b = torch.nn.Parameter(torch.randn(6))
    grad_out = torch.randn(5, 3, 6)
    F.linear(x, w, b).backward(grad_out)
    ref = (x.grad.clone(), w.grad.clone(), b.grad.clone())
    x.grad = w.grad = b.grad = None

    fired = []
    w.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    store = WeightGradStore()
    with store.capture():
        DeferredWeightGemm(store)(x, w, b).backward(grad_out)
    assert w.grad is None and not fired                    # B: input and bias gradients only
    torch.testing.assert_close(x.grad, ref[0], rtol=0, atol=0)
    torch.testing.assert_close(b.grad, ref[2], rtol=1e-6, atol=1e-6)
    store.run_oldest()                                     # W
    assert store.pending() == 0 and len(fired) == 1
    # The same products as autograd's mm, summed in another order: fp32 rounding only.
    torch.testing.assert_close(w.grad, ref[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ training
RUN = Run(seq=16, rows=8, lr=1e-3, warmup=1, steps=2)
FIRST, LAST = (0, 1, 2, 3), (4, 5, 6, 7)
CASES = [
    Case("pp2-zb_h1", (0, 1), pp=2, schedule="zb_h1"),
    Case("pp4-zb_h1", LAST, pp=4, schedule="zb_h1"),
    Case("tp2-sp-pp2-zb_h1-recompute", FIRST, tp=2, pp=2, schedule="zb_h1", sequence_parallel=True),
    Case("pp2-dp2-zero1-zb_h1-tied-overlap-fused-loss", LAST, pp=2, schedule="zb_h1", tied=True, fast=True),
]
FIELDS = dict(num_layers=8)


def global_batches(seed: int = 40) -> list[dict]:
    """RUN's packed global batches (tests.test_pipeline_zbv draws its own with another seed)."""
    lens = [[5, 7, 4], [9, 3], [16], [2, 2, 2, 2], [11], [6, 6], [3, 12], [8, 8]]
    return [packed_batch([lens[(i + s) % len(lens)] for i in range(RUN.rows)], RUN.seq, 1003, seed=seed + s)
            for s in range(RUN.steps)]


def case_fields(case: Case) -> dict:
    """The tiny model of a case: FIELDS, full recompute when the case's name says so, tied or not."""
    recompute = {"recompute": "full"} if "recompute" in case.name else {}
    return tiny_fields(**FIELDS, **recompute, tie_embeddings=case.tied)


def _rank_main(hf_dirs: dict) -> dict:
    return train_cases(CASES, RUN, case_fields, lambda case: hf_dirs[case.tied], global_batches())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    refs, dirs = tied_and_untied_references(tmp_path_factory.mktemp("hf"), FIELDS, global_batches(), RUN, seed=11)
    return refs, run_ranks(_rank_main, 8, dirs, timeout=900)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_zb_h1_train_steps_match_plain_pytorch(trained, case):
    refs, per_rank = trained
    ref_losses, ref_weights = refs[case.tied]
    check_case(case, per_rank, ref_losses, ref_weights, RUN)
