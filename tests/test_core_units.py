"""Single-process checks of the core: worked loss example, layout grid, config validation."""
from __future__ import annotations

import math

import pytest
import torch

from megasft.config import Config, ConfigError
from megasft.layout import Layout
from megasft.parallel_state import rank_grid
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


def test_rank_grid_matches_megatron_worked_example():
    grid = rank_grid(16, tp=2, pp=4)
    assert grid["tp"][:3] == [[0, 1], [2, 3], [4, 5]]
    assert grid["dp"][:4] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert grid["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert grid["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]


def test_invalid_world_size_names_the_fix():
    with pytest.raises(ConfigError, match=r"world_size=4 is not divisible by tp\*pp=3\*1=3"):
        rank_grid(4, tp=3, pp=1)


@pytest.mark.parametrize("override, message", [
    ("parallel.tp=5", "tp=5 does not divide num_attention_heads=32; choose tp in"),
    ("model.num_kv_heads=3", "not a multiple of num_kv_heads=3"),
    ("parallel.pp=3", "does not split evenly"),
    ("train.precision=fp16", "not one of ['bf16', 'fp32']"),
    ("model.hiden_size=4", "did you mean 'hidden_size'"),
    ("data.global_batch_tokens=1000", "not a multiple of seq_len=2048"),
])
def test_config_validation_is_actionable(override, message):
    with pytest.raises(ConfigError) as err:
        Layout.validated(Config.load(None, [override]), 120)
    assert message in str(err.value)


def test_tp_split_round_trip_with_vocab_padding():
    full = torch.arange(10 * 3).view(10, 3).float()
    for rank in range(4):
        split = TPSplit(0, (Shard(10, 4, rank, padded=16),))
        local = split.local_from_full([full])
        assert local.shape == (4, 3)
        for _, offset, piece in split.pieces(local):
            assert torch.equal(piece, full[offset:offset + piece.shape[0]])


@pytest.mark.parametrize("overrides, message", [
    (["parallel.pp=2", "parallel.pipeline_schedule=interleaved"], "needs virtual_pipeline_size > 1"),
    (["parallel.pp=2", "parallel.virtual_pipeline_size=2", "parallel.pipeline_schedule=1f1b"],
     "use pipeline_schedule=interleaved"),
    (["parallel.pp=2", "parallel.virtual_pipeline_size=2", "data.global_batch_tokens=6144"],
     "micro-batches per step (3) to be a multiple of pp=2; use global_batch_tokens=4096"),
])
def test_pipeline_config_rules(overrides, message):
    with pytest.raises(ConfigError) as err:
        Layout.validated(Config.load(None, overrides), 2)
    assert message in str(err.value)


def test_yaml_on_off_progress_bar_is_accepted():
    assert Config.load(None, ["train.progress_bar=off"]).train.progress_bar == "off"
    assert Config.load(None, ["train.progress_bar=on"]).train.progress_bar == "on"
