"""Best-fit-decreasing packing against a brute-force reference, and packed micro-batch tensors."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megasft.data.packing import CapacityTree, build_micro_batch, pack_best_fit, packing_efficiency


def reference_best_fit(lengths, seq_len):
    """Quadratic textbook BFD: scan all open rows for the tightest fit."""
    free = []
    for n in sorted(lengths, reverse=True):
        fits = [i for i, f in enumerate(free) if f >= n]
        if fits:
            i = min(fits, key=lambda i: free[i])
            free[i] -= n
        else:
            free.append(seq_len - n)
    return sorted(seq_len - f for f in free)


def test_capacity_tree_matches_brute_force():
    rng = random.Random(0)
    tree, counts = CapacityTree(100), [0] * 101
    for _ in range(3000):
        cap = rng.randrange(101)
        if rng.random() < 0.6 or counts[cap] == 0:
            tree.add(cap)
            counts[cap] += 1
        else:
            tree.add(cap, -1)
            counts[cap] -= 1
        lo = rng.randrange(101)
        expected = next((c for c in range(lo, 101) if counts[c]), -1)
        assert tree.smallest_at_least(lo) == expected


@pytest.mark.parametrize("seq_len", [16, 100, 128, 2048])
def test_pack_best_fit_equals_reference_and_keeps_every_document(seq_len):
    rng = np.random.default_rng(seq_len)
    lengths = np.clip(rng.lognormal(np.log(seq_len / 6), 1.0, 500).astype(int), 1, seq_len)
    rows = pack_best_fit(lengths, seq_len)
    flat = sorted(d for row in rows for d in row)
    assert flat == list(range(len(lengths)))  # every document exactly once, never split
    fills = [int(lengths[row].sum()) for row in rows]
    assert max(fills) <= seq_len
    assert sorted(fills) == reference_best_fit(lengths.tolist(), seq_len)


def test_packing_deterministic_and_efficient():
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(np.log(300), 1.0, 20000).astype(int), 1, 2048)
    rows = pack_best_fit(lengths, 2048)
    assert rows == pack_best_fit(lengths, 2048)
    assert packing_efficiency(lengths, rows, 2048) >= 0.98


def test_too_long_document_is_an_error():
    with pytest.raises(ValueError, match="seq_len=8"):
        pack_best_fit([3, 9], 8)


def test_micro_batch_tensors():
    docs = [(np.array([10, 11, 12]), np.array([0, 1, 1])), (np.array([20, 21]), np.array([1, 1])),
            (np.array([30, 31, 32, 33, 34, 35, 36, 37]), np.array([0, 0, 0, 1, 1, 1, 1, 1]))]
    b = build_micro_batch([[docs[0], docs[1]], [docs[2]]], 8, pad_id=0)
    assert b.input_ids.tolist() == [[10, 11, 12, 20, 21, 0, 0, 0], [30, 31, 32, 33, 34, 35, 36, 37]]
    # First token of each document never trained; padding -100; trained labels equal the input ids.
    assert b.labels.tolist() == [[-100, 11, 12, -100, 21, -100, -100, -100], [-100, -100, -100, 33, 34, 35, 36, 37]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2], list(range(8))]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 8, 16] and b.cu_seqlens.dtype == torch.int32
    assert b.max_seqlen == 8 and isinstance(b.max_seqlen, int)
    assert b.trained_tokens == 8
    assert b.input_ids.dtype == b.labels.dtype == b.position_ids.dtype == torch.int64


def test_every_token_appears_once_in_packed_rows():
    rng = np.random.default_rng(1)
    docs = [(rng.integers(1, 1000, n), rng.integers(0, 2, n)) for n in rng.integers(1, 64, 200)]
    rows = pack_best_fit([len(d[0]) for d in docs], 64)
    b = build_micro_batch([[docs[d] for d in row] for row in rows], 64, pad_id=0)
    ids, cu = b.input_ids.reshape(-1), b.cu_seqlens.tolist()
    segments = [ids[a:e].tolist() for a, e in zip(cu[:-1], cu[1:])]
    expected = [docs[d][0].tolist() for row in rows for d in row]
    assert [s for s in segments if any(s)] == expected  # padding segments are all pad (0)
    positions = b.position_ids.reshape(-1)
    for a, e in zip(cu[:-1], cu[1:]):
        assert positions[a:e].tolist() == list(range(e - a))
