"""Global batches: DP sharding, epochs, exact resume, eval split, per-rank reads."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megasft.config import DataConfig
from megasft.data.indexed import IndexedDataset, IndexedDatasetBuilder
from megasft.data.loader import PackedLoader, build_loaders, split_documents

SEQ = 32


def make_dataset(path, n_docs=60, seed=0):
    """Document d holds the token d+1 repeated (so every row tells which documents it packed)."""
    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(path, vocab_size=1000)
    for d in range(n_docs):
        n = int(rng.integers(2, SEQ + 1))
        builder.add(np.full(n, d + 1), (rng.random(n) < 0.5).astype(np.uint8))
    builder.finish({"pad_id": 0})
    return IndexedDataset(path)


def docs_in(batch):
    ids, cu = batch.input_ids.reshape(-1), batch.cu_seqlens.tolist()
    return [int(ids[a]) - 1 for a, e in zip(cu[:-1], cu[1:]) if ids[a] != 0]


def global_docs(loaders):
    """Documents of one optimizer step over all ranks, in rank then micro-batch order."""
    return [d for ld in loaders for mb in ld.next_global_batch() for d in docs_in(mb)]


def test_micro_batch_contract(tmp_path):
    ds = make_dataset(tmp_path)
    loader = PackedLoader(ds, SEQ, global_batch_tokens=4 * SEQ, micro_batch_size=2, dp_rank=1, dp_size=2, seed=3)
    mbs = loader.next_global_batch()
    assert len(mbs) == 1
    b = mbs[0]
    assert b.input_ids.shape == b.labels.shape == b.position_ids.shape == (2, SEQ)
    cu = b.cu_seqlens
    assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == 2 * SEQ
    assert b.max_seqlen == int((cu[1:] - cu[:-1]).max())
    trained = b.labels != -100
    assert torch.equal(b.labels[trained], b.input_ids[trained])
    starts = cu[:-1].long()
    assert (b.labels.reshape(-1)[starts] == -100).all()  # first token of each segment untrained


def test_each_epoch_covers_every_document_once_across_ranks(tmp_path):
    ds = make_dataset(tmp_path)
    loaders = [PackedLoader(ds, SEQ, 4 * SEQ, 1, dp_rank=r, dp_size=2, seed=5) for r in range(2)]
    e0, e1 = loaders[0].epoch_rows(0), loaders[0].epoch_rows(1)
    for plan in (e0, e1):  # every document exactly once per epoch
        assert sorted(d for row in plan for d in row) == list(range(len(ds)))
    assert e0 != e1  # reshuffled per epoch
    steps = len(e0) // 4 + 2
    stream = [d for _ in range(steps) for d in global_docs(loaders)]
    # The ranks' rows, concatenated per step, are the epoch plans back to back (no row lost at the seam).
    expected = [d for row in (e0 + e1)[:4 * steps] for d in row]
    assert stream == expected
    assert loaders[0].state.epoch == 1


def test_ranks_read_only_their_rows(tmp_path):
    ds = make_dataset(tmp_path)
    loaders = [PackedLoader(ds, SEQ, 8 * SEQ, 2, dp_rank=r, dp_size=4, seed=1) for r in range(4)]
    touched = {}
    for r, loader in enumerate(loaders):
        mine = IndexedDataset(tmp_path)
        reads = []
        original = mine.__class__.__getitem__
        mine.__class__ = type("Counting", (IndexedDataset,), {"__getitem__": lambda s, d: (reads.append(d), original(s, d))[1]})
        loader.dataset = mine
        docs = [d for mb in loader.next_global_batch() for d in docs_in(mb)]
        assert sorted(reads) == sorted(docs)
        touched[r] = set(reads)
    for a in range(4):
        for b in range(a + 1, 4):
            assert not touched[a] & touched[b]


@pytest.mark.parametrize("stop", [1, 7, 13])
def test_resumed_loader_yields_the_same_rows(tmp_path, stop):
    ds = make_dataset(tmp_path)
    make = lambda: PackedLoader(ds, SEQ, 6 * SEQ, 3, dp_rank=1, dp_size=2, seed=11)
    straight = make()
    expected = [straight.next_global_batch() for _ in range(20)]  # crosses several epochs
    first = make()
    for _ in range(stop):
        first.next_global_batch()
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    for want in expected[stop:]:
        got = resumed.next_global_batch()
        assert len(got) == len(want)
        for g, w in zip(got, want):
            for key in ("input_ids", "labels", "position_ids", "cu_seqlens"):
                assert torch.equal(getattr(g, key), getattr(w, key))


def test_resume_with_other_dp_size_sees_same_global_rows(tmp_path):
    ds = make_dataset(tmp_path)
    two = [PackedLoader(ds, SEQ, 4 * SEQ, 1, dp_rank=r, dp_size=2, seed=2) for r in range(2)]
    expected = [global_docs(two) for _ in range(6)]
    four = [PackedLoader(ds, SEQ, 4 * SEQ, 1, dp_rank=r, dp_size=4, seed=2) for r in range(4)]
    for ld in four:
        ld.next_global_batch()
        ld.next_global_batch()
    state = four[0].state_dict()
    one = PackedLoader(ds, SEQ, 4 * SEQ, 4, dp_rank=0, dp_size=1, seed=2)
    one.load_state_dict(state)
    assert [global_docs([one]) for _ in range(4)] == expected[2:]
    with pytest.raises(ValueError, match="seed"):
        PackedLoader(ds, SEQ, 4 * SEQ, 1, seed=3).load_state_dict(state)


def test_eval_split_and_one_pass(tmp_path):
    ds = make_dataset(tmp_path, n_docs=50)
    train_docs, eval_docs = split_documents(len(ds), 0.2, seed=4)
    assert len(eval_docs) == 10 and not set(train_docs) & set(eval_docs)
    assert set(train_docs) | set(eval_docs) == set(range(50))
    cfg = DataConfig(train_path=str(tmp_path), eval_fraction=0.2, seq_len=SEQ, global_batch_tokens=4 * SEQ,
                     micro_batch_size=1)
    per_rank = [build_loaders(cfg, seed=4, dp_rank=r, dp_size=2) for r in range(2)]
    evals = [e for _, e in per_rank]
    passes = [list(e.one_pass()) for e in evals]
    assert len(passes[0]) == len(passes[1]) and all(len(gb) == 2 for gb in passes[0])
    seen = [d for p in passes for gb in p for mb in gb for d in docs_in(mb)]
    assert sorted(seen) == sorted(eval_docs.tolist())
    train_seen = {d for _ in range(5) for d in global_docs([t for t, _ in per_rank])}
    assert not train_seen & set(eval_docs.tolist())
    separate = DataConfig(train_path=str(tmp_path), eval_path=str(tmp_path), seq_len=SEQ,
                          global_batch_tokens=4 * SEQ, micro_batch_size=1)
    train, evalset = build_loaders(separate, seed=4)
    assert len(train.doc_indices) == 50 and len(evalset.doc_indices) == 50


def test_bad_batch_geometry_is_an_error(tmp_path):
    ds = make_dataset(tmp_path)
    with pytest.raises(ValueError, match="multiple of seq_len"):
        PackedLoader(ds, SEQ, 100, 1)
    with pytest.raises(ValueError, match="do not split into dp=3"):
        PackedLoader(ds, SEQ, 4 * SEQ, 1, dp_size=3)
    with pytest.raises(ValueError, match="--seq-len 16"):
        PackedLoader(ds, 16, 16 * 4, 1)
