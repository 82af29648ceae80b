"""The warmup + cosine schedule against the seed's worked example and torch's LambdaLR."""
import math

import pytest
import torch

from megasft.config import OptimConfig
from megasft.optim.lr_schedule import WarmupCosine, warmup_cosine_lr


def test_seed_worked_example():
    # T=10, Tw=2, peak 2e-5, floor 10 %: the four values quoted by the issue, at the steps they fall on.
    schedule = WarmupCosine(peak_lr=2e-5, warmup_steps=2, total_steps=10, min_lr_ratio=0.1)
    expected = {0: 1.0e-5, 1: 2.0e-5, 5: 1.44e-5, 9: 2.69e-6}
    for step, lr in expected.items():
        assert float(f"{schedule(step):.3g}") == lr, (step, schedule(step))
    # t=3 written out: progress (3-2)/8.
    assert schedule(3) == pytest.approx(2e-5 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 8))), rel=1e-12)


def test_shape_of_schedule():
    peak = 3e-4
    lrs = [warmup_cosine_lr(t, peak, 4, 20, 0.1) for t in range(25)]
    assert lrs[3] == pytest.approx(peak) and lrs[4] == pytest.approx(peak)  # warmup ends on the peak
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))  # monotone decay after warmup
    assert lrs[20] == pytest.approx(0.1 * peak) and lrs[24] == pytest.approx(0.1 * peak)  # floor, held
    assert warmup_cosine_lr(0, peak, 0, 10, 0.1) == pytest.approx(peak)  # no warmup starts at the peak


def test_lambda_lr_semantics_and_config():
    cfg = OptimConfig(lr=1e-3, warmup_steps=3, min_lr_ratio=0.2)
    schedule = WarmupCosine.from_config(cfg, total_steps=12)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule.multiplier)
    for t in range(14):
        assert opt.param_groups[0]["lr"] == pytest.approx(schedule(t), rel=1e-12)
        opt.step()
        sched.step()
    # warmup_ratio is used when warmup_steps is unset: 3 % of 100 steps.
    assert WarmupCosine.from_config(OptimConfig(), total_steps=100).warmup_steps == 3
