"""Best-fit-decreasing packing of whole documents into rows of ``seq_len`` tokens, and the tensors of a
packed micro-batch (labels, position ids restarting per document, cu_seqlens).

Best-fit-decreasing: take documents longest first and put each into the open row whose free space
is the smallest that still fits it (Johnson 1973: at most 11/9 OPT + 6/9 rows). Open rows are kept in
a segment tree over their *free capacity* (0..seq_len), so "smallest capacity >= L" is one
O(log seq_len) descent and the whole pack is O(n log n) for the sort plus O(n log seq_len).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from megasft.data.batch import IGNORE_INDEX, MicroBatch


class CapacityTree:
    """Counts of open rows per free capacity, with 'smallest capacity >= x that has a row' queries."""

    def __init__(self, max_capacity: int) -> None:
        self.size = 1 << max(1, max_capacity).bit_length()  # leaves 0..size-1 cover 0..max_capacity
        self.count = [0] * (2 * self.size)

    def add(self, cap: int, delta: int = 1) -> None:
        i = cap + self.size
        while i:
            self.count[i] += delta
            i >>= 1

    def smallest_at_least(self, lo: int) -> int:
        """Smallest capacity >= lo held by some row, or -1."""
        count, node = self.count, lo + self.size
        if count[node]:
            return lo
        # Climb while the node is a right child or its right sibling is empty; every subtree passed
        # on the way covers only capacities < lo or already-checked empty ones.
        while node > 1 and (node & 1 or not count[node + 1]):
            node >>= 1
        if node == 1:
            return -1
        node += 1
        while node < self.size:  # descend to the leftmost non-empty leaf
            node = 2 * node if count[2 * node] else 2 * node + 1
        return node - self.size


def pack_best_fit(lengths: Sequence[int], seq_len: int) -> list[list[int]]:
    """Rows of document indices, each row's lengths summing to <= seq_len; every index exactly once.

    Ties in length keep the input order (stable sort), so the caller's seeded shuffle makes the result
    deterministic per seed.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > seq_len or lengths.min() < 1):
        bad = int(np.flatnonzero((lengths > seq_len) | (lengths < 1))[0])
        raise ValueError(f"document {bad} has length {int(lengths[bad])}, outside 1..seq_len={seq_len}; "
                         "preprocess with --seq-len so long documents are dropped or truncated")
    order = np.argsort(-lengths, kind="stable")
    tree = CapacityTree(seq_len)
    rows_with_cap: list[list[int]] = [[] for _ in range(seq_len + 1)]
    rows: list[list[int]] = []
    for d, n in zip(order.tolist(), lengths[order].tolist()):
        cap = tree.smallest_at_least(n)
        if cap < 0:
            r, free = len(rows), seq_len - n
            rows.append([d])
        else:
            r, free = rows_with_cap[cap].pop(), cap - n
            tree.add(cap, -1)
            rows[r].append(d)
        if free:  # full rows leave the structure
            rows_with_cap[free].append(r)
            tree.add(free)
    return rows


def packing_efficiency(lengths: Sequence[int], rows: Sequence[Sequence[int]], seq_len: int) -> float:
    """Real tokens / token slots."""
    return float(np.sum(np.asarray(lengths, dtype=np.int64))) / max(1, len(rows) * seq_len)


def padded_lengths(lengths: np.ndarray, multiple: int) -> np.ndarray:
    """Document lengths rounded up to `multiple` (the slots each takes in a row; 1 = unpadded)."""
    return lengths if multiple == 1 else -(-lengths // multiple) * multiple


def build_micro_batch(rows: Sequence[Sequence[tuple[np.ndarray, np.ndarray]]], seq_len: int,
                      pad_id: int, doc_multiple: int = 1) -> MicroBatch:
    """One micro-batch from rows of (ids, loss_mask) documents.

    labels[r, t] = input_ids[r, t] where trained else IGNORE_INDEX (HF convention, the loss shifts);
    the first token of every document is IGNORE_INDEX, so the shifted loss never predicts across a
    document boundary. Padding tails are their own segment (positions 0..), untrained. cu_seqlens runs over the
    flattened [b * s] tokens, row r occupying r*s .. (r+1)*s.

    With `doc_multiple` m > 1 (context parallelism: m = 2*cp) every document's segment is padded to a
    multiple of m with untrained pad tokens at its end (positions continuing), which no real token
    attends to, so the real tokens' logits are unchanged.
    """
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)   # [b, s]
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)  # [b, s]
    position_ids = np.zeros((b, seq_len), dtype=np.int64)        # [b, s]
    arange = np.arange(seq_len, dtype=np.int64)
    cu = [0]
    for r, docs in enumerate(rows):
        pos = 0
        for ids, mask in docs:
            n = len(ids)
            slots = -(-n // doc_multiple) * doc_multiple
            if pos + slots > seq_len:
                raise ValueError(f"row {r} holds {pos + slots} tokens > seq_len={seq_len}")
            input_ids[r, pos:pos + n] = ids
            labels[r, pos:pos + n] = np.where(np.asarray(mask, dtype=bool), input_ids[r, pos:pos + n], IGNORE_INDEX)
            labels[r, pos] = IGNORE_INDEX
            position_ids[r, pos:pos + slots] = arange[:slots]
            pos += slots
            cu.append(r * seq_len + pos)
        if pos < seq_len:
            position_ids[r, pos:] = arange[:seq_len - pos]
            cu.append((r + 1) * seq_len)
    cu_seqlens = np.asarray(cu, dtype=np.int32)
    return MicroBatch(input_ids=torch.from_numpy(input_ids), position_ids=torch.from_numpy(position_ids),
                      cu_seqlens=torch.from_numpy(cu_seqlens), max_seqlen=int(np.diff(cu_seqlens).max()) if b else 0,
                      labels=torch.from_numpy(labels))
