"""Single-process checks of the vocab-parallel loss (a worked example), the HF label shift and
the TP split of canonical tensors."""
from __future__ import annotations

import math

import pytest
import torch

from megasft.data.batch import shift_labels
from megasft.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megasft.tensor_parallel.spec import Shard, TPSplit


def _logits_with_losses(losses: list[float]) -> torch.Tensor:
    """Two-way logits [n, 2] whose CE against target 0 is exactly `losses`:
    CE = log(1 + e^-d) for a margin d, so d = -log(e^L - 1)."""
    d = torch.tensor([-math.log(math.expm1(x)) for x in losses], dtype=torch.float64)
    return torch.stack([d, torch.zeros_like(d)], dim=1)


def test_seed_worked_example_masked_vs_unmasked():
    # 8 tokens: 5 prompt tokens (losses 0.9 1.2 0.8 1.1 0.6) and 3 trained answer tokens
    # (0.9 0.7 0.9). Masked loss 2.50/3 = 0.833; averaging every token would give 7.10/8 = 0.888.
    losses = [0.9, 1.2, 0.8, 1.1, 0.6, 0.9, 0.7, 0.9]
    logits = _logits_with_losses(losses)
    masked = torch.tensor([-100] * 5 + [0] * 3)
    loss_sum, count = vocab_parallel_cross_entropy(logits, masked, 0, 2, None)
    assert int(count) == 3 and loss_sum.item() == pytest.approx(2.50, abs=1e-9)
    assert (loss_sum / count).item() == pytest.approx(0.8333, abs=1e-4)
    all_sum, all_count = vocab_parallel_cross_entropy(logits, torch.zeros(8, dtype=torch.long), 0, 2, None)
    assert (all_sum / all_count).item() == pytest.approx(0.8875, abs=1e-4)


def test_shift_labels_is_hf_convention():
    labels = torch.tensor([[-100, 5, 6, -100]])
    assert shift_labels(labels).tolist() == [[5, 6, -100, -100]]


def test_tp_split_round_trip_with_vocab_padding():
    full = torch.arange(10 * 3).view(10, 3).float()
    for rank in range(4):
        split = TPSplit(0, (Shard(10, 4, rank, padded=16),))
        local = split.local_from_full([full])
        assert local.shape == (4, 3)
        for _, offset, piece in split.pieces(local):
            assert torch.equal(piece, full[offset:offset + piece.shape[0]])
